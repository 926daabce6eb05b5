"""MoMa (layers/moe/moma.py): one modality is the plain MoE layer (token choice) or an independent
expert-choice formula; tokens never reach another modality's experts; causality by perturbation
where it is claimed; FLOPs against XLA; expert parallelism on 8 fake devices; one-line errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybrax.layers.auxiliary import forward_with_auxiliaries
from hybrax.layers.moe import MoE, MoEConfig
from hybrax.layers.moe.moma import MoMa
from hybrax.layers.moe.moma_config import MoMaConfig

from devices import run_with_devices

D, F = 32, 16


def inputs(B=2, T=16, seed=1):
    x = jax.random.normal(jax.random.key(seed), (B, T, D), jnp.float32)
    modality = jnp.asarray(np.random.default_rng(seed).integers(0, 2, size=(B, T)), jnp.int32)
    return x, modality


def moma(routing="expert_choice", groups=(2, 3), **kw):
    config = MoMaConfig(d_model=D, experts_per_modality=list(groups), expert_hidden=F, routing=routing, **kw)
    return MoMa(config, rngs=nnx.Rngs(0))


def swiglu(x, w_gate, w_up, w_down):
    return (jax.nn.silu(x @ w_gate) * (x @ w_up)) @ w_down


@pytest.mark.parametrize("dispatch", ["dropless", pytest.param("capacity", marks=pytest.mark.slow)])
def test_one_modality_token_choice_is_the_moe_layer(dispatch):
    """Law: with a single group, MoMa's token choice is the MoE layer with the same weights, in
    evaluation and training (outputs and reported losses)."""
    kw = dict(top_k=2, dispatch=dispatch, capacity_factor=1.0, num_shared_experts=1, z_loss_weight=0.01)
    ours = moma("token_choice", groups=(4,), **kw)
    plain = MoE(MoEConfig(d_model=D, num_experts=4, expert_hidden=F, **kw), rngs=nnx.Rngs(0))
    nnx.update(plain, nnx.state(ours, nnx.Param))
    x, _ = inputs()
    np.testing.assert_array_equal(ours(x), plain(x))
    ours.train()
    plain.train()
    (y1, l1, _), (y2, l2, _) = forward_with_auxiliaries(ours, x), forward_with_auxiliaries(plain, x)
    np.testing.assert_array_equal(y1, y2)
    assert l1.keys() == l2.keys() and all(float(l1[k]) == float(l2[k]) for k in l1)


def test_one_modality_expert_choice_matches_the_formula():
    """Training-mode expert choice against a direct loop: s = softmax(x W_r); expert e adds
    s[t, e] SwiGLU_e(x_t) to its C = ceil(T c / E) tokens of highest s[:, e], per row."""
    layer = moma("expert_choice", groups=(4,), capacity_factor=1.5)
    layer.train()
    x, _ = inputs(T=12)
    y, _, _ = forward_with_auxiliaries(layer, x)
    w_r, wg, wu, wd = (np.asarray(p[...], np.float64) for p in (layer.router, layer.w_gate, layer.w_up, layer.w_down))
    xs = np.asarray(x, np.float64)
    C = int(np.ceil(12 * 1.5 / 4))
    want = np.zeros_like(xs)
    for b in range(2):
        logits = xs[b] @ w_r
        s = np.exp(logits - logits.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        for e in range(4):
            for t in np.argsort(-s[:, e], kind="stable")[:C]:
                want[b, t] += s[t, e] * np.asarray(swiglu(xs[b, t], wg[e], wu[e], wd[e]))
    np.testing.assert_allclose(y, want, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("routing,training", [
    ("expert_choice", True),
    *[pytest.param(r, t, marks=pytest.mark.slow) for r, t in (("token_choice", False), ("expert_choice", False),
                                                           ("token_choice", True))]])
def test_tokens_never_reach_another_modalitys_experts(routing, training):
    """Changing every weight of modality 1's experts leaves each modality-0 token's output
    bit-identical, and gives those weights zero gradient from modality-0 tokens."""
    layer = moma(routing)
    if training:
        layer.train()
    x, modality = inputs()
    run = lambda m: forward_with_auxiliaries(m, x, modality_ids=modality)[0]  # noqa: E731
    base = run(layer)
    for w in (layer.w_gate, layer.w_up, layer.w_down):
        w[...] = w[...].at[2:].multiply(3.0)       # experts 2, 3, 4: modality 1
    changed = run(layer)
    zero = np.asarray(modality) == 0
    np.testing.assert_array_equal(np.asarray(base)[zero], np.asarray(changed)[zero])
    assert not np.allclose(np.asarray(base)[~zero], np.asarray(changed)[~zero])
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def loss(params):
        y = forward_with_auxiliaries(nnx.merge(graphdef, params, rest, copy=True), x, modality_ids=modality)[0]
        return jnp.sum(jnp.where((modality == 0)[..., None], y, 0.0))
    grads = jax.grad(loss)(params)
    for name in ("w_gate", "w_up", "w_down"):
        g = np.asarray(grads[name][...])
        assert np.all(g[2:] == 0) and np.any(g[:2] != 0), name


@pytest.mark.parametrize("routing,training", [
    ("token_choice", True), *[pytest.param(r, t, marks=pytest.mark.slow) for r, t in (
        ("expert_choice", False), ("token_choice", False))]])
def test_causal_by_perturbation(routing, training):
    """Changing token s (and its modality) leaves every earlier output bit-identical. Expert
    choice in training reads the whole row and does not claim this."""
    layer = moma(routing)
    if training:
        layer.train()
    x, modality = inputs(T=20)
    run = lambda x, m: forward_with_auxiliaries(layer, x, modality_ids=m)[0]  # noqa: E731
    base = run(x, modality)
    for s in (4, 13):
        changed = run(x.at[:, s].add(1.0), modality.at[:, s].set(1 - modality[:, s]))
        np.testing.assert_array_equal(np.asarray(base[:, :s]), np.asarray(changed[:, :s]))


def test_expert_choice_reports_its_inference_mismatch():
    layer = moma("expert_choice")
    layer.train()
    x, modality = inputs(B=4, T=32)
    _, losses, metrics = forward_with_auxiliaries(layer, x, modality_ids=modality)
    assert float(losses["router_bce"]) > 0 and 0 <= float(metrics["mismatch"]) <= 1
    np.testing.assert_allclose(np.asarray(metrics["modality_share"]).sum(), 1.0)
    assert np.asarray(metrics["load"]).shape == (5,)


@pytest.mark.parametrize("routing", ["expert_choice", pytest.param("token_choice", marks=pytest.mark.slow)])
def test_flops_per_token_matches_xla_cost_analysis(routing):
    """Expert choice: the formula counts its slots and the one-hot gather and combine. Token choice
    is the MoE layer's count; as in test_moe.py, capacity mode at capacity_factor 1 (T k slots per
    row) plus the dispatch and combine einsums (2 E C D per token each) is what XLA sees."""
    config = MoMaConfig(d_model=128, experts_per_modality=[4, 4], expert_hidden=256, routing=routing, top_k=2,
                        **({"dispatch": "capacity", "capacity_factor": 1.0} if routing == "token_choice" else {}))
    layer = MoMa(config, rngs=nnx.Rngs(0))
    layer.train()
    graphdef, state = nnx.split(layer)
    x = jnp.zeros((2, 64, 128), jnp.float32)
    modality = jnp.asarray(np.random.default_rng(0).integers(0, 2, size=(2, 64)), jnp.int32)
    run = lambda s, x, m: forward_with_auxiliaries(nnx.merge(graphdef, s), x, modality_ids=m)[0]  # noqa: E731
    analysis = jax.jit(run).lower(state, x, modality).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    expected = config.flops_per_token(64)
    if routing == "token_choice":
        expected += 2 * (2 * config.num_experts * config.capacity(64) * 128)
    ratio = expected / (analysis["flops"] / (2 * 64))
    assert 0.95 <= ratio <= 1.05, ratio


@pytest.mark.parametrize("kw,message", [
    (dict(experts_per_modality=[2, 0]), "needs one or more groups of >= 1 experts"),
    (dict(experts_per_modality=[2, 2], num_experts=5), "num_experts=5 must equal the sum"),
    (dict(routing="token_choice", top_k=3, experts_per_modality=[4, 2]), "top_k=3 exceeds the smallest"),
    (dict(routing="random"), "routing='random' is not one of"),
])
def test_bad_settings_are_one_line_errors(kw, message):
    with pytest.raises(ValueError, match=message):
        MoMaConfig(d_model=D, expert_hidden=F, **kw)


EXPERT_PARALLEL = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from hybrax.layers.auxiliary import forward_with_auxiliaries
from hybrax.layers.moe.moma import MoMa
from hybrax.layers.moe.moma_config import MoMaConfig

def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))

results = {}
x = jax.random.normal(jax.random.key(1), (8, 12, 32), jnp.float32)
modality = jnp.asarray(np.random.default_rng(0).integers(0, 2, size=(8, 12)), jnp.int32)
cot = jax.random.normal(jax.random.key(2), x.shape, jnp.float32)
for routing, training in (("expert_choice", True), ("expert_choice", False), ("token_choice", True)):
    layer = MoMa(MoMaConfig(d_model=32, experts_per_modality=[4, 4], expert_hidden=16, routing=routing, top_k=2,
                            balance_loss_weight=0.1), rngs=nnx.Rngs(0))
    if training:
        layer.train()
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def loss(params, x):
        y, losses, _ = forward_with_auxiliaries(nnx.merge(graphdef, params, rest, copy=True), x, modality_ids=modality)
        return jnp.sum(y * cot) + 100.0 * sum(losses.values())

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    single = step(params, x)
    for shape in ((1, 8), (2, 4)):
        mesh = jax.make_mesh(shape, ("data", "expert"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
        with jax.set_mesh(mesh):
            text = step.lower(params, x).as_text()
            sharded = step(params, x)
        errors = [rel(a, b) for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single))]
        results[f"{routing} training={training} data={shape[0]} expert={shape[1]}"] = {
            "max_rel_error": max(errors), "all_to_all": text.count("all_to_all")}
print(json.dumps(results))
"""


@pytest.mark.slow
@pytest.mark.multi_device
def test_expert_parallel_equals_one_device():
    """8 fake devices, meshes data=1 x expert=8 and data=2 x expert=4: output, losses and every
    gradient within 1e-5 of one device, with the experts' tokens moved by all_to_all."""
    results = run_with_devices(EXPERT_PARALLEL, devices=8)
    assert len(results) == 6
    for name, r in results.items():
        assert r["max_rel_error"] <= 1e-5 and r["all_to_all"] >= 2, (name, r)
