"""Mixture-of-Depths (arch/mixture_of_depths.py): a routed block against a direct loop of its
formula, in training (packed documents too) and evaluation; causality by perturbation where it is
claimed; decoding equal to the parallel forward, with MoMa experts as the MoMa paper combines them,
and a cache that holds only the kept tokens; parameter and FLOP counts; one-line config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybrax.arch import CausalLM, ModelConfig
from hybrax.layers.auxiliary import forward_with_auxiliaries

BASE = dict(d_model=32, num_layers=4, num_heads=4, num_kv_heads=2, vocab_size=64, init_std=0.3)
MOMA = dict(ffns=["moma"], moma={"experts_per_modality": [2, 2], "expert_hidden": 16})


def model(seed=0, **settings) -> CausalLM:
    routing = {"capacity": 0.5, **settings.pop("depth_routing", {})}
    return CausalLM(ModelConfig(**BASE, **settings, depth_routing=routing), rngs=nnx.Rngs(seed))


def tokens(B=2, T=12, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 64, size=(B, T)), jnp.int32)


def reference(routed, x_BxTxD, kept_BxT, segment_ids=None, positions=None):
    """The formula, one row at a time: the kept tokens alone (in order, with their own positions and
    segments) through the block; each adds sigmoid(l) (block(x) - x); the others pass unchanged."""
    out = np.array(x_BxTxD, np.float32)
    logit_BxT = np.asarray(routed._logit(x_BxTxD))
    for b in range(x_BxTxD.shape[0]):
        kept = np.flatnonzero(np.asarray(kept_BxT[b]))
        take = lambda a: None if a is None else a[b:b + 1, kept]  # noqa: E731
        row_positions = jnp.asarray(kept[None], jnp.int32) if positions is None else take(positions)
        y, _ = routed.block(x_BxTxD[b:b + 1, kept], positions=row_positions, segment_ids=take(segment_ids))
        gate = 1 / (1 + np.exp(-logit_BxT[b, kept]))
        out[b, kept] += gate[:, None] * np.asarray(y[0] - x_BxTxD[b, kept])
    return out


@pytest.mark.parametrize("packed", [False, True])
def test_a_routed_block_is_its_formula(packed):
    """Training: the top C = ceil(T / 2) tokens by router logit; evaluation: the tokens with logit > 0."""
    routed = model().blocks[1]
    x = jax.random.normal(jax.random.key(1), (2, 13, 32), jnp.float32)
    segment_ids = jnp.asarray([[1] * 6 + [2] * 7, [3] * 13], jnp.int32) if packed else None
    positions = jnp.asarray([list(range(6)) + list(range(7)), list(range(13))], jnp.int32) if packed else None
    logit = np.asarray(routed._logit(x))
    top = np.zeros(logit.shape, bool)
    for b in range(2):
        top[b, np.argsort(-logit[b], kind="stable")[:7]] = True
    for training, kept in ((True, top), (False, logit > 0)):
        routed.deterministic = not training
        got, _ = routed(x, segment_ids=segment_ids, positions=positions)
        want = reference(routed, x, kept, segment_ids, positions)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    assert 0 < (logit > 0).mean() < 1     # the evaluation case keeps some tokens and skips others


def test_capacity_one_is_the_plain_model():
    plain = CausalLM(ModelConfig(**BASE), rngs=nnx.Rngs(0))
    full = CausalLM(ModelConfig(**BASE, depth_routing={"capacity": 1.0}), rngs=nnx.Rngs(0))
    x = tokens()
    np.testing.assert_array_equal(np.asarray(full(x)), np.asarray(plain(x)))


@pytest.mark.parametrize("settings", [{}, pytest.param(MOMA, marks=pytest.mark.slow)])
def test_evaluation_is_causal_by_perturbation_and_training_is_not(settings):
    """Evaluation keeps tokens by l > 0: changing token s leaves every logit before s bit-identical.
    Training's top-C reads the whole row; its mismatch metric says how often inference differs."""
    lm = model(seed=2, **settings)
    x = tokens(T=16)
    for s in (3, 9, 15):
        base, changed = lm(x), lm(x.at[:, s].set((x[:, s] + 1) % 64))
        np.testing.assert_array_equal(np.asarray(base[:, :s]), np.asarray(changed[:, :s]))
        assert not np.allclose(base[:, s:], changed[:, s:])
    lm.train()
    base, losses, metrics = forward_with_auxiliaries(lm, x)
    assert {"blocks/1/router_bce", "blocks/3/router_bce"} <= set(losses)
    assert all(0 <= float(metrics[f"blocks/{i}/{k}"]) <= 1 for i in (1, 3) for k in ("mismatch", "inference_share"))
    perturbed = lambda s: forward_with_auxiliaries(lm, x.at[:, s].set((x[:, s] + 1) % 64))[0]  # noqa: E731
    differs = [not np.array_equal(np.asarray(base[:, :s]), np.asarray(perturbed(s)[:, :s])) for s in range(1, 16)]
    assert any(differs)


@pytest.mark.parametrize("settings", [{"mixers": ["gla", "attention"]}, pytest.param(MOMA, marks=pytest.mark.slow)])
def test_decoding_equals_the_parallel_forward_and_caches_only_kept_tokens(settings):
    """Prefill 5 tokens, then one at a time, against the parallel forward (1e-5); with MoMa
    experts, by modality. A routed attention block's cache holds exactly its kept tokens."""
    lm = model(seed=5, **settings)
    x = tokens(B=2, T=11)
    modality = jnp.asarray(np.random.default_rng(1).integers(0, 2, size=(2, 11)), jnp.int32)
    kw = (lambda a, b: {"modality_ids": modality[:, a:b]}) if "ffns" in settings else (lambda a, b: {})
    graphdef, state = nnx.split(lm)
    call = jax.jit(lambda x, cache, kw: nnx.merge(graphdef, state)(x, cache=cache, **kw))
    full = lm(x, **kw(0, 11))
    cache = lm.init_cache(2, 11)
    parts = []
    logits, cache = call(x[:, :5], cache, kw(0, 5))
    parts.append(logits)
    for t in range(5, 11):
        logits, cache = call(x[:, t:t + 1], cache, kw(t, t + 1))
        parts.append(logits)
    np.testing.assert_allclose(jnp.concatenate(parts, axis=1), full, rtol=1e-5, atol=1e-5)
    attention = cache[3]["block"]                      # block 3: routed, attention in both settings
    h = lm.embed(x)
    for block in lm.blocks[:3]:
        h, _ = block(h, **kw(0, 11))
    kept = np.asarray(lm.blocks[3]._logit(h) > 0).sum(axis=1)
    assert np.asarray(attention["end"]).reshape(-1).tolist() == kept.tolist() and 0 < kept.sum() < 22
    assert np.asarray(cache[3]["position"]).tolist() == [11, 11]


@pytest.mark.parametrize("settings", [{}, pytest.param(MOMA, marks=pytest.mark.slow)])
def test_parameter_and_flop_counts(settings):
    """num_params is the built model's; flops_per_token (routed blocks: C of T tokens at length C,
    and the router) within 5% of XLA's cost analysis of the training forward."""
    config = ModelConfig(**{**BASE, "d_model": 128, "init_std": 0.02}, **settings,
                         depth_routing={"capacity": 0.25})
    lm = CausalLM(config, rngs=nnx.Rngs(0))
    assert config.num_params() == sum(a.size for a in jax.tree.leaves(nnx.state(lm, nnx.Param)))
    lm.train()
    graphdef, state = nnx.split(lm)
    x = jnp.zeros((2, 96), jnp.int32)
    kw = {"modality_ids": jnp.asarray(np.arange(192).reshape(2, 96) % 2, jnp.int32)} if settings else {}
    run = lambda s, t: forward_with_auxiliaries(nnx.merge(graphdef, s), t, **kw)[0]  # noqa: E731
    analysis = jax.jit(run).lower(state, x).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    ratio = config.flops_per_token(96) / (analysis["flops"] / x.size)
    assert 0.95 <= ratio <= 1.05, ratio


@pytest.mark.parametrize("settings,message", [
    (dict(depth_routing={"capacity": 0.0}), r"capacity=0.0 must be in \(0, 1\]"),
    (dict(depth_routing={"every": 0}), "every=0 must be >= 1"),
    (dict(depth_routing={"every": 5}), "every=5 routes no block of model.num_layers=4"),
    (dict(depth_routing={}, recursion={"num_recursions": 2}), "set one of them"),
])
def test_bad_settings_are_one_line_errors(settings, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**BASE, **settings)
