"""Multi-head Latent Attention's own laws (the mixer contract is checked by test_conformance.py):

    absorbed decoding (prefill, single tokens, a chunk) == the expanded forward
    the expanded forward == a per-head float64 reference written from the formula
    the cache holds exactly d_c + R Dr numbers per token (and the counter `end`)
    the absorbed form without a cache (the sequence-parallel path's math on one device) == the
    expanded form, outputs and every gradient

for the tiny config (Dk = Dn + R Dr = 12 > Dv = 8: v is padded) and a variant with low-rank
queries, two rope heads and Dv = 12 > Dk = 10 (q and k are padded). Odd length, packed segments.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import conformance
from hybrax.layers.config import TINY_SHAPE
from hybrax.layers.softmax.mla import MLA, MLAConfig

T = conformance.TINY_LENGTH   # 13
TOLERANCE = conformance.TOLERANCE
CONFIGS = {
    "tiny": MLAConfig(**MLAConfig.tiny).bind(TINY_SHAPE),
    "q_latent": MLAConfig(kv_latent=12, q_latent=10, nope_head_dim=6, value_head_dim=12, rope_head_dim=2,
                          rope_heads=2).bind(TINY_SHAPE),
}
SEGMENT_IDS = np.asarray([[0] * 5 + [1] * 8, [3] * T], np.int32)   # row 0: a second document from 5
POSITIONS = np.asarray([list(range(5)) + list(range(8)), list(range(T))], np.int32)


def subject(name):
    return CONFIGS[name], MLA


@functools.cache
def forward(name):
    """jit of (params, x, segment_ids, positions, absorbed) -> y over the noised module."""
    graphdef, params, rest = nnx.split(conformance.build(subject(name)), nnx.Param, ...)

    @functools.partial(jax.jit, static_argnames="absorbed")
    def call(params, x, segment_ids, positions, absorbed):
        return nnx.merge(graphdef, params, rest, copy=True).forward(x, segment_ids=segment_ids, positions=positions,
                                                                     absorbed=absorbed)
    return params, call


def errors(got, want) -> tuple[float, float]:
    """(max |a - b|, max |a - b| / max |b|)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want))), conformance.error(got, want)


# ---- 1. absorbed decoding == expanded forward ---------------------------------------------------------

@pytest.mark.parametrize("name", CONFIGS)
def test_absorbed_decoding_equals_the_expanded_forward(name):
    layer, module = conformance.jitted(subject(name)), conformance.build(subject(name))
    x = conformance.inputs(seed=11)
    full = layer(x)
    for chunks in ((5, 1, 1, 4, 1, 1),):   # prefill, single tokens, a chunk, single tokens
        cache, outputs, start = module.init_cache(x.shape[0], T + 3), [], 0
        for n in chunks:
            y, cache = layer(x[:, start:start + n], cache=cache)
            outputs.append(y)
            start += n
        assert set(cache) == {"latent", "k_rope", "end"} and int(cache["end"]) == T
        absolute, relative = errors(jnp.concatenate(outputs, axis=1), full)
        assert relative <= TOLERANCE, f"{name} {chunks}: absorbed decoding off by {absolute:.2e} ({relative:.2e})"


# ---- 2. expanded forward == the formula, head by head ----------------------------------------------------

def rotary(x, positions):
    """Rotary over the last axis of x [B, T, ..., P] (its two halves), at positions [B, T], float64."""
    half = x.shape[-1] // 2
    angle = positions[:, :, None].astype(np.float64) * 10_000.0 ** (-np.arange(half) / half)   # [B, T, half]
    angle = angle.reshape(angle.shape[:2] + (1,) * (x.ndim - 3) + (half,))
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle), x2 * np.cos(angle) + x1 * np.sin(angle)], -1)


def reference(c: MLAConfig, p: dict, x, segment_ids, positions):
    """y [B, T, d] from the module docstring's formula, one (row, head) at a time, in float64."""
    if c.q_latent is None:
        q_nope, q_rope = np.einsum("btd,dhn->bthn", x, p["w_q_nope"]), np.einsum("btd,dhrp->bthrp", x, p["w_q_rope"])
    else:
        q_latent = x @ p["w_dq"]
        q_nope = np.einsum("btq,qhn->bthn", q_latent, p["w_uq_nope"])
        q_rope = np.einsum("btq,qhrp->bthrp", q_latent, p["w_uq_rope"])
    q_rope = rotary(q_rope, positions)                                     # [B, T, H, R, Dr]
    latent = x @ p["w_dkv"]
    k_nope, v = np.einsum("btc,chn->bthn", latent, p["w_uk"]), np.einsum("btc,chv->bthv", latent, p["w_uv"])
    k_rope = rotary(np.einsum("btd,drp->btrp", x, p["w_kr"]), positions)   # [B, T, R, Dr]
    B, T, H = q_nope.shape[:3]
    visible = np.tril(np.ones((T, T), bool))
    y = np.zeros(x.shape)
    for b in range(B):
        seen = visible & (segment_ids[b][:, None] == segment_ids[b][None, :])
        for h in range(H):
            scores = q_nope[b, :, h] @ k_nope[b, :, h].T + np.einsum("trp,urp->tu", q_rope[b, :, h], k_rope[b])
            scores = np.where(seen, scores / np.sqrt(c.nope_head_dim + c.rope_heads * c.rope_head_dim), -np.inf)
            weights = np.exp(scores - scores.max(-1, keepdims=True))
            weights /= weights.sum(-1, keepdims=True)
            y[b] += (weights @ v[b, :, h]) @ p["w_o"][h]
    return y


@pytest.mark.parametrize("name", CONFIGS)
def test_the_expanded_forward_is_the_formula(name):
    params, call = forward(name)
    x = conformance.inputs(seed=12)
    got = call(params, x, jnp.asarray(SEGMENT_IDS), jnp.asarray(POSITIONS), absorbed=False)
    p = {path[-1]: np.asarray(value[...], np.float64) for path, value in nnx.to_flat_state(params)}
    want = reference(CONFIGS[name], p, np.asarray(x, np.float64), SEGMENT_IDS, POSITIONS)
    absolute, relative = errors(got, want)
    assert relative <= TOLERANCE, f"{name}: expanded form off the formula by {absolute:.2e} ({relative:.2e})"


# ---- 3. the cache: d_c + R Dr numbers per token -----------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", CONFIGS)
def test_the_cache_holds_the_latent_and_the_rope_keys_only(name, dtype):
    c = CONFIGS[name].model_copy(update={"dtype": dtype})
    module = nnx.eval_shape(lambda: MLA(c, rngs=nnx.Rngs(0)))
    per_token = (c.kv_latent + c.rope_heads * c.rope_head_dim) * jnp.dtype(dtype).itemsize
    assert c.kv_cache_bytes_per_token() == per_token and c.state_bytes_per_sequence() == 0
    for B, S in ((2, 16), (3, 37)):
        cache = jax.eval_shape(lambda: module.init_cache(B, S))
        size = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(cache))
        assert size == B * S * c.kv_cache_bytes_per_token() + 4, (name, dtype, B, S, jax.tree.map(jnp.shape, cache))


# ---- 4. absorbed form without a cache (the ring's math on one device) == expanded ------------------------

@pytest.mark.parametrize("name", CONFIGS)
def test_the_absorbed_form_equals_the_expanded_one_with_every_gradient(name):
    params, call = forward(name)
    x = conformance.inputs(seed=13)
    cotangent = jnp.asarray(np.random.default_rng(14).normal(size=x.shape), jnp.float32)
    segment_ids, positions = jnp.asarray(SEGMENT_IDS), jnp.asarray(POSITIONS)

    def loss(params, x, absorbed):
        y = call(params, x, segment_ids, positions, absorbed=absorbed)
        return jnp.sum(y * cotangent), y

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), static_argnums=2)
    results = {}
    for absorbed in (False, True):
        (_, y), (dparams, dx) = step(params, x, absorbed)
        results[absorbed] = {"y": y, "d x": dx, **{"d " + "/".join(map(str, path)): value[...]
                                                   for path, value in nnx.to_flat_state(dparams)}}
    assert len(results[True]) == 2 + len(nnx.to_flat_state(params))
    for what, want in results[False].items():
        absolute, relative = errors(results[True][what], want)
        assert relative <= TOLERANCE, f"{name}: absorbed {what} off by {absolute:.2e} ({relative:.2e})"
