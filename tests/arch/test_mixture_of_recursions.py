"""Mixture-of-Recursions (arch/mixture_of_recursions.py): the plain model at N_r = 1, causality by
perturbation where it is claimed, decoding from both kinds of KV cache equal to the parallel forward,
fixed capacities, the routers' losses and metrics, parameter and FLOP counts, one-line config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybrax.arch import CausalLM, ModelConfig
from hybrax.arch.mixture_of_recursions import stored_kv_bytes
from hybrax.arch.token_routing import compact
from hybrax.layers.auxiliary import forward_with_auxiliaries

BASE = dict(d_model=32, num_layers=4, num_heads=4, num_kv_heads=2, vocab_size=64)


def config(**recursion) -> ModelConfig:
    return ModelConfig(**BASE, recursion=recursion)


VARIANTS = {
    "expert_choice": config(num_recursions=3),
    "expert_choice_shared_kv": config(num_recursions=3, kv_cache="shared"),
    "token_choice": config(num_recursions=3, routing="token_choice", capacity=[1.0, 0.75, 0.5]),
    "token_choice_shared_kv": config(num_recursions=3, routing="token_choice", kv_cache="shared", sharing="cycle",
                                     capacity=[1.0, 0.5, 0.5]),
    "none_cycle": config(num_recursions=2, routing="none", sharing="cycle"),
}


def tokens(B=2, T=12, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 64, size=(B, T)), jnp.int32)


def blocks_of(model: CausalLM) -> list:
    r = model.recursions
    return [*r.first, *r.shared, *r.last]


def test_compact_puts_wanted_tokens_first_in_order():
    wanted = jnp.asarray([[False, True, False, True, True, False]])
    index, kept = compact(wanted, 4)
    assert index.tolist() == [[1, 3, 4, 0]] and kept.tolist() == [[True, True, True, False]]
    index, kept = compact(wanted, 2)   # overflow: the later wanted token is dropped
    assert index.tolist() == [[1, 3]] and kept.tolist() == [[True, True]]


@pytest.mark.parametrize("sharing,routing", [
    ("middle_cycle", "expert_choice"),
    *[pytest.param(s, r, marks=pytest.mark.slow) for s, r in (
        ("cycle", "token_choice"), ("cycle", "expert_choice"), ("middle_cycle", "token_choice"), ("cycle", "none"),
        ("middle_cycle", "none"))]])
def test_one_recursion_at_full_capacity_is_the_plain_model(sharing, routing):
    """Law: N_r = 1 and capacity 1 is the CausalLM of the same layers, in training and evaluation."""
    vanilla = CausalLM(ModelConfig(**BASE), rngs=nnx.Rngs(0))
    mor = CausalLM(config(num_recursions=1, sharing=sharing, routing=routing), rngs=nnx.Rngs(1))
    for mine, theirs in zip(blocks_of(mor), vanilla.blocks):
        nnx.update(mine, nnx.state(theirs))
    nnx.update(mor.embed, nnx.state(vanilla.embed))
    x = tokens()
    want = vanilla(x)
    np.testing.assert_allclose(mor(x), want, rtol=1e-6, atol=1e-6)
    mor.train()
    got, _, _ = forward_with_auxiliaries(mor, x)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def _perturbed_prefix_is_identical(model, x, s, training: bool):
    run = (lambda t: forward_with_auxiliaries(model, t)[0]) if training else model
    base, changed = run(x), run(x.at[:, s].set((x[:, s] + 1) % 64))
    np.testing.assert_array_equal(np.asarray(base[:, :s]), np.asarray(changed[:, :s]))
    assert not np.allclose(base[:, s:], changed[:, s:])


@pytest.mark.parametrize("name,training", [
    ("token_choice", True),
    *[pytest.param(n, t, marks=pytest.mark.slow) for n, t in (
        ("expert_choice", False), ("expert_choice_shared_kv", False),     # expert choice infers by l > 0
        ("token_choice", False), ("token_choice_shared_kv", True),
        ("none_cycle", True))]])
def test_causal_by_perturbation(name, training):
    """Changing token s leaves every logit before s bit-identical, for the modes that claim it."""
    model = CausalLM(VARIANTS[name], rngs=nnx.Rngs(2))
    if training:
        model.train()
    x = tokens(T=16)
    for s in (3, 9, 15):
        _perturbed_prefix_is_identical(model, x, s, training)


@pytest.mark.slow
def test_expert_choice_training_is_not_causal_and_says_how_often_inference_differs():
    """Training's top-k reads the whole row: a later token can change an earlier output. The
    mismatch metric is the share of active tokens where l > 0 disagrees with top-k."""
    model = CausalLM(VARIANTS["expert_choice"], rngs=nnx.Rngs(3))
    model.train()
    x = tokens(B=4, T=32)
    _, losses, metrics = forward_with_auxiliaries(model, x)
    assert {"recursions/router_bce_1", "recursions/router_bce_2"} <= set(losses)
    assert 0.0 <= float(metrics["recursions/mismatch_1"]) <= 1.0
    share = np.asarray(metrics["recursions/depth_share"])
    np.testing.assert_allclose(share, [1.0, 22 / 32, 11 / 32])   # ceil(2/3 * 32), ceil(1/3 * 32)
    differs = []
    for s in range(1, 32):
        y = forward_with_auxiliaries(model, x.at[:, s].set((x[:, s] + 1) % 64))[0]
        base = forward_with_auxiliaries(model, x)[0]
        differs.append(not np.array_equal(np.asarray(base[:, :s]), np.asarray(y[:, :s])))
    assert any(differs)


@pytest.mark.slow
def test_token_choice_reports_depths_and_balance():
    model = CausalLM(VARIANTS["token_choice"], rngs=nnx.Rngs(4))
    model.train()
    _, losses, metrics = forward_with_auxiliaries(model, tokens(B=4, T=32))
    assigned = np.asarray(metrics["recursions/assigned_share"])
    assert assigned.shape == (3,) and abs(assigned.sum() - 1) < 1e-6
    assert float(losses["recursions/depth_balance_loss"]) > 0
    share = np.asarray(metrics["recursions/depth_share"])
    assert share[0] == 1.0 and share[1] <= 0.75 and share[2] <= min(0.5, share[1])


@pytest.mark.parametrize("name", [
    "token_choice_shared_kv",
    *[pytest.param(n, marks=pytest.mark.slow) for n in ("expert_choice", "expert_choice_shared_kv", "token_choice",
                                                         "none_cycle")]])
def test_decoding_equals_parallel_forward(name):
    """Evaluation mode: prefill 5 tokens, then one at a time, against the parallel forward over
    the whole row (max_len = T, which fixes token_choice's capacities)."""
    model = CausalLM(VARIANTS[name], rngs=nnx.Rngs(5))
    x = tokens(B=2, T=11)
    graphdef, state = nnx.split(model)
    call = jax.jit(lambda x, cache: nnx.merge(graphdef, state)(x, cache=cache))
    full = model(x)
    cache = model.init_cache(2, 11)
    parts = []
    logits, cache = call(x[:, :5], cache)
    parts.append(logits)
    for t in range(5, 11):
        logits, cache = call(x[:, t:t + 1], cache)
        parts.append(logits)
    np.testing.assert_allclose(jnp.concatenate(parts, axis=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_kv_cache_bytes_per_token():
    """Per-recursion caches store a step's keys and values only for the tokens it took; shared
    caching stores the first step's alone. Bytes per token, from the filled caches."""
    x = tokens(B=2, T=24)
    measured = {}
    for name in ("expert_choice", "expert_choice_shared_kv"):
        model = CausalLM(VARIANTS[name], rngs=nnx.Rngs(6))
        _, cache = model(x, cache=model.init_cache(2, 24))
        measured[name] = stored_kv_bytes(cache) / x.size
        taken = np.asarray(cache["counts"]).sum(axis=0) / x.size      # share of tokens each step took
        per_token = 2 * 2 * 8 * 4                                      # k and v, 2 kv heads x 8, float32
        shared_layers = 2
        if name == "expert_choice":
            want = per_token * (2 + shared_layers * taken.sum())
        else:
            want = per_token * (2 + shared_layers)
        assert measured[name] == pytest.approx(want), (name, measured[name], want)
    assert measured["expert_choice_shared_kv"] < measured["expert_choice"]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_num_params_matches_model(name):
    model = CausalLM(VARIANTS[name], rngs=nnx.Rngs(0))
    assert VARIANTS[name].num_params() == sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("recursion", [
    dict(num_recursions=3),
    pytest.param(dict(num_recursions=3, kv_cache="shared"), marks=pytest.mark.slow),
    pytest.param(dict(num_recursions=3, routing="token_choice"), marks=pytest.mark.slow),
    pytest.param(dict(num_recursions=2, routing="none", sharing="cycle"), marks=pytest.mark.slow),
])
def test_flops_per_token_counts_active_tokens(recursion):
    """The training forward's FLOPs per token within 5% of XLA's cost analysis: the shared layers
    count once per step for the tokens the step takes, at its shorter length."""
    cfg = ModelConfig(d_model=128, num_layers=4, num_heads=4, recursion=recursion)
    model = CausalLM(cfg, rngs=nnx.Rngs(0))
    model.train()
    graphdef, state = nnx.split(model)
    x = jnp.zeros((2, 96), jnp.int32)
    run = lambda s, t: forward_with_auxiliaries(nnx.merge(graphdef, s), t)[0]  # noqa: E731
    analysis = jax.jit(run).lower(state, x).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    ratio = cfg.flops_per_token(96) / (analysis["flops"] / x.size)
    assert 0.95 <= ratio <= 1.05, ratio


@pytest.mark.parametrize("recursion,message", [
    (dict(sharing="middle_cycle", num_recursions=2, _layers=2), "needs num_layers >= 3"),
    (dict(num_recursions=2, capacity=[0.5, 1.0]), "must lie in \\(0, 1\\] and not increase"),
    (dict(num_recursions=3, capacity=[1.0, 0.5]), "has 2 values for num_recursions=3"),
    (dict(num_recursions=2, kv_cache="shared", capacity=[0.5, 0.5]), "needs capacity\\[0\\] = 1"),
    (dict(num_recursions=2, routing="expert"), "routing='expert' is not one of"),
    (dict(num_recursions=0), "num_recursions=0 must be >= 1"),
    (dict(num_recursions=2, kv_cache="shared", _mixers=["gla"]), "shared layers must be attention"),
    (dict(num_recursions=2, _ffns=["moma"]), "does not pass modality ids to its shared layers"),
])
def test_bad_settings_are_one_line_errors(recursion, message):
    recursion = dict(recursion)
    layers, mixers = recursion.pop("_layers", 4), recursion.pop("_mixers", ["attention"])
    ffns = recursion.pop("_ffns", ["swiglu"])
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{**BASE, "num_layers": layers, "mixers": mixers, "ffns": ffns}, recursion=recursion)
