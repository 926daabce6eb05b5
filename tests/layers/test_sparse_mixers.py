"""The block-selection mixers (moba, nsa, bilevel_routing_attention): causality through gradients
and through perturbations (a leak through the discrete block choice shows only in the latter),
token-by-token decoding == the parallel form, packed documents == documents alone, jit == eager,
the parameter count, MoBA with every block selected == dense causal attention, and the shared
causal top-k against a loop."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybrax.layers.sparse import block_selection as bs
from hybrax.layers.softmax.attention import Attention, AttentionConfig
from hybrax.layers.sparse.bilevel_routing_attention import BilevelRoutingAttention, BilevelRoutingConfig
from hybrax.layers.sparse.moba import MoBA, MoBAConfig
from hybrax.layers.sparse.nsa import NSA, NSAConfig

D = 32
T = 37  # 5 blocks of 8, the last one partial: blocks 3 and 4 have more candidates than top_k
IMPLEMENTATION = None  # block_sparse_attention: the best for the backend (xla on CPU)
SHAPES = dict(d_model=D, num_heads=4, num_kv_heads=2, head_dim=8, block_size=8, top_k=2, init_std=0.2,
              implementation=IMPLEMENTATION)
CONFIGS = {
    "moba": (MoBA, MoBAConfig(**SHAPES)),
    "nsa": (NSA, NSAConfig(**SHAPES, window=8, compress_block=4)),
    "bilevel_routing_attention": (BilevelRoutingAttention, BilevelRoutingConfig(**SHAPES)),
}
KNOWN_AXES = {"embed", "heads", "kv_heads", "head_dim", "conv", None}


@functools.cache
def build(name):
    module, config = CONFIGS[name]
    layer = module(config, rngs=nnx.Rngs(0))
    if name == "nsa":  # gates away from 1/2 and compression away from the mean, per head and position
        layer.w_gate[...] = layer.w_gate[...] * 10.0
        layer.compress_k[...] = layer.compress_k[...] * jax.random.uniform(jax.random.key(1), layer.compress_k.shape,
                                                                           minval=0.0, maxval=2.0)
    return layer


@functools.cache
def jitted(name):
    graphdef, state = nnx.split(build(name))
    call = jax.jit(lambda state, x, segment_ids, positions, cache: nnx.merge(graphdef, state)(
        x, segment_ids=segment_ids, positions=positions, cache=cache))
    return lambda x, segment_ids=None, positions=None, cache=None: call(state, x, segment_ids, positions, cache)


def x_input(T, B=2, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(B, T, D)), jnp.float32)


@pytest.mark.parametrize("name", CONFIGS)
def test_parameter_budget_and_axes(name):
    params = nnx.to_flat_state(nnx.state(build(name), nnx.Param))
    assert sum(var[...].size for _, var in params) == CONFIGS[name][1].num_params()
    for path, var in params:
        axes = var.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == var[...].ndim and set(axes) <= KNOWN_AXES, (path, axes)


@pytest.mark.parametrize("name", CONFIGS)
def test_causal_through_gradients(name):
    """d (r_t . y_t) / d x_s == 0 exactly for every s > t (r_t random), != 0 within t's own block."""
    layer = jitted(name)
    x = x_input(T, B=1)
    r_TxD = jax.random.normal(jax.random.key(2), (T, D))
    grad_t = lambda t: jax.grad(lambda x: jnp.vdot(layer(x)[0, t], r_TxD[t]))(x)[0]  # noqa: E731
    influence_TxS = np.abs(np.asarray(jax.jit(jax.vmap(grad_t))(jnp.arange(T)))).sum(-1)
    assert np.all(influence_TxS[np.triu_indices(T, k=1)] == 0)
    same_block = (np.arange(T)[:, None] // 8 == np.arange(T)[None, :] // 8) & np.tri(T, dtype=bool)
    assert np.all(influence_TxS[same_block] > 0)


@pytest.mark.parametrize("name", CONFIGS)
def test_causal_by_perturbation(name):
    """Replacing the input at position s leaves every output before s bit-for-bit unchanged (a block
    choice made by a later token of the block would change them), and changes the output at s."""
    layer = jitted(name)
    x = x_input(T, seed=3)
    y = layer(x)
    for s in (1, 8, 20, 25, 26, 29, 33, 36):
        x_changed = x.at[:, s].set(5.0 * jax.random.normal(jax.random.key(s), (2, D)))
        y_changed = layer(x_changed)
        np.testing.assert_array_equal(y_changed[:, :s], y[:, :s], err_msg=f"s={s}")
        assert np.all(np.abs(y_changed[:, s] - y[:, s]).max(-1) > 1e-4)


@pytest.mark.parametrize("name", CONFIGS)
def test_cached_decoding_matches_parallel(name):
    """Prefill 5, then single tokens across block boundaries, then 19 tokens from the middle of a
    block (routing queries from the cache, then new ones), then single tokens again."""
    chunks = [5] + [1] * 10 + [19] + [1] * 3
    layer = jitted(name)
    x = x_input(T)
    full = layer(x)
    cache = build(name).init_cache(batch=2, max_len=T + 3)
    outs, start = [], 0
    for n in chunks:
        y, cache = layer(x[:, start:start + n], cache=cache)
        outs.append(y)
        start += n
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5, rtol=0)
    assert int(cache["end"]) == T


@pytest.mark.parametrize("name", CONFIGS)
def test_packed_document_equals_document_alone(name):
    """Row 0 packs a 16-token document (two whole blocks) and a 21-token one; each gives what it gives
    alone. (Block boundaries are row positions: a document must start on one to match exactly.)"""
    layer = jitted(name)
    x = x_input(T)
    segment_ids = jnp.asarray([[1] * 16 + [2] * 21, [7] * T], jnp.int32)
    positions = jnp.asarray([list(range(16)) + list(range(21)), list(range(T))], jnp.int32)
    y = layer(x, segment_ids=segment_ids, positions=positions)
    np.testing.assert_allclose(y[0, :16], layer(x[:1, :16])[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(y[0, 16:], layer(x[:1, 16:])[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(y[1], layer(x[1:])[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", CONFIGS)
def test_jit_equals_eager(name):
    x = x_input(19)
    np.testing.assert_allclose(jitted(name)(x), build(name)(x), atol=1e-6, rtol=1e-5)


def test_moba_with_every_block_selected_is_dense_attention():
    """top_k >= the number of blocks: every past block plus the current one, i.e. causal attention."""
    config = MoBAConfig(**{**SHAPES, "top_k": 5})
    moba = MoBA(config, rngs=nnx.Rngs(4))
    attention = Attention(AttentionConfig(d_model=D, num_heads=4, num_kv_heads=2, head_dim=8), rngs=nnx.Rngs(5))
    for weight in ("w_q", "w_k", "w_v", "w_o"):
        getattr(attention, weight)[...] = getattr(moba, weight)[...]
    x = x_input(T)
    np.testing.assert_allclose(moba(x), attention(x), atol=1e-6, rtol=0)


def test_causal_top_k_blocks_matches_a_loop():
    rng = np.random.default_rng(6)
    B, H, N, top_k = 2, 3, 7, 3
    scores = rng.normal(size=(B, H, N, N)).astype(np.float32)
    valid = rng.random((B, N, N)) < 0.7
    got = np.asarray(bs.causal_top_k_blocks(jnp.asarray(scores), jnp.arange(N), top_k, jnp.asarray(valid)))
    for b, h, n in np.ndindex(B, H, N):
        candidates = [m for m in range(n) if valid[b, n, m]]
        best = sorted(candidates, key=lambda m: -scores[b, h, n, m])[:top_k]
        np.testing.assert_array_equal(got[b, h, n], best + [-1] * (top_k - len(best)) + [n])


@pytest.mark.parametrize("name", CONFIGS)
def test_flops_count_only_the_selected_blocks(name):
    """Past (top_k + 1) blocks the attention term stops growing with the sequence: doubling it adds
    only the routing (and for nsa the compressed tokens); one more selected block adds 4 H D block."""
    config = CONFIGS[name][1]
    H, Dh, b = config.num_heads, config.head_dim, config.block_size
    growth = config.flops_per_token(4096) - config.flops_per_token(2048)
    routing = 2 * H * Dh * (4096 - 2048) // b // b
    if name == "nsa":
        compressed = (4096 - 2048) // config.compress_block
        routing = 2 * H * Dh * (4096 // 4 - 2048 // 4) // b
        assert growth == 4 * H * Dh * compressed + routing
    else:
        assert growth == routing
    more = type(config)(**{**config.__dict__, "top_k": config.top_k + 1})
    assert more.flops_per_token(4096) - config.flops_per_token(4096) == 4 * H * Dh * b
