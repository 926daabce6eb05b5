"""Union of Experts (layers/moe/union_routing.py, selective_attention.py, union_mlp.py): the causal
choice against a sequential reference of its rule; with every expert selected each layer IS the
dense block (`attention`, `swiglu`, same weights); causality by perturbation in training and
evaluation mode; decoding token by token == the parallel form; the budgets (parameters, FLOPs
against XLA's cost analysis); the metrics; the one-line errors. The registered `uoe_attention`
(expert_selection) is also held to the mixer contract by tests/layers/test_conformance.py; the
patch_selection variant is run through the same checks here (slow)."""

import functools
import math
from fractions import Fraction
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import conformance
from hybrax.arch import CausalLM, ModelConfig
from hybrax.layers.auxiliary import forward_with_auxiliaries
from hybrax.layers.config import TINY_SHAPE, ModelShape
from hybrax.layers.mlp import MLPConfig, SwiGLU
from hybrax.layers.moe import union_routing as routing
from hybrax.layers.moe.selective_attention import SelectiveAttention, SelectiveAttentionConfig
from hybrax.layers.moe.union_mlp import UnionMLP, UnionMLPConfig
from hybrax.layers.softmax.attention import Attention, AttentionConfig
from hybrax.pallas_kernels.grouped_matmul.xla import plan

ROUTINGS = routing.ROUTINGS
LAYERS = {"attention": (SelectiveAttentionConfig, SelectiveAttention), "mlp": (UnionMLPConfig, UnionMLP)}
T = 13            # patches of 4: the last one partial
LAW = 1e-6        # all experts == the dense block, max |difference| / max |dense|


def build(layer: str, routing_mode: str, **settings):
    """A tiny UoE layer (TINY_SHAPE: d_model 32, 4 heads, 2 key/value heads, SwiGLU width 64) with
    weights large enough to route and attend unevenly; by default half the experts per unit
    (top_k 2 of 4, rho = 1/2), so the budgets refuse offers."""
    config_class, module_class = LAYERS[layer]
    base = {"top_k": 2, "capacity_factor": 1.0, "patch_size": 4, "init_std": 0.3, "routing": routing_mode}
    if layer == "mlp":
        base["num_experts"] = 4
    config = config_class(**{**base, **settings}).bind(TINY_SHAPE)
    return module_class(config, rngs=nnx.Rngs(0))


def inputs(B=2, length=T, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(B, length, TINY_SHAPE.d_model)), jnp.float32)


def jitted(module):
    """module(x, **keywords) under one jax.jit (keywords left out are not passed: SwiGLU takes x only)."""
    graphdef, state = nnx.split(module)
    call = jax.jit(lambda state, x, keywords: nnx.merge(graphdef, state)(x, **keywords))
    return lambda x, **keywords: call(state, x, {k: v for k, v in keywords.items() if v is not None})


def scale_error(a, b) -> float:
    return conformance.error(a, b)


# ---- the choice --------------------------------------------------------------------------------------

def reference_take(logits_TxE, positions_T, segments_T, *, top_k: int, rate: Fraction, unit: int) -> np.ndarray:
    """The rule of union_routing, one token at a time: a unit's first token offers it to its top_k
    experts; each takes it while under ceil(rate (j + 1)) units of the document; counts restart at
    a document start."""
    T_, E = logits_TxE.shape
    count, current = np.zeros(E, int), np.zeros(E, bool)
    take = np.zeros((T_, E), bool)
    for t in range(T_):
        document = t == 0 or positions_T[t] <= positions_T[t - 1] or (
            segments_T is not None and segments_T[t] != segments_T[t - 1])
        if document:
            count[:] = 0
        if document or positions_T[t] % unit == 0:
            offers = np.zeros(E, bool)
            offers[np.argsort(-logits_TxE[t])[:top_k]] = True
            limit = math.ceil(rate * (positions_T[t] // unit + 1))
            current = offers & (count < limit)
            count += current
        take[t] = current
    return take


@pytest.mark.parametrize("unit", [1, 4])
def test_choice_follows_the_sequential_rule(unit):
    """Packed rows (documents at 0, 7 and 9, positions restarting); with patches, the single-document
    row decoded in two runs with the carried state."""
    E, top_k, rate, length = 6, 2, Fraction(3, 7), 29
    rng = np.random.default_rng(unit)
    logits = rng.normal(size=(2, length, E)).astype(np.float32)
    segments = np.stack([np.cumsum(np.isin(np.arange(length), (7, 9))), np.zeros(length, int)]).astype(np.int32)
    starts = np.maximum.accumulate(np.where(np.diff(segments, prepend=-1, axis=1) != 0, np.arange(length), 0), axis=1)
    positions = (np.arange(length) - starts).astype(np.int32)
    document, start, index = jax.jit(routing.units, static_argnums=2)(jnp.asarray(positions), jnp.asarray(segments),
                                                                      unit)
    choose = jax.jit(routing.choose, static_argnames=("top_k", "rate"))
    choice = choose(jnp.asarray(logits), document, start, index, top_k=top_k, rate=rate)
    for b in range(2):
        want = reference_take(logits[b], positions[b], segments[b], top_k=top_k, rate=rate, unit=unit)
        np.testing.assert_array_equal(np.asarray(choice.take_BxTxE[b]), want)
    assert 0 < np.mean(want) < top_k / E      # the budgets refused some offers
    if unit > 1:   # decoding row 1 (one document) in two runs, the second starting inside a patch
        split = 9
        first = choose(jnp.asarray(logits[1:, :split]), *routing.decoding_units(jnp.arange(split), 1, unit),
                       top_k=top_k, rate=rate)
        second = choose(jnp.asarray(logits[1:, split:]), *routing.decoding_units(jnp.arange(split, length), 1, unit),
                        top_k=top_k, rate=rate, count_BxE=first.count_BxE, current_BxE=first.current_BxE)
        np.testing.assert_array_equal(np.concatenate([first.take_BxTxE[0], second.take_BxTxE[0]]),
                                      np.asarray(choice.take_BxTxE[1]))


def test_slots_hold_each_experts_tokens_in_order_up_to_the_buffer():
    take = jnp.asarray(np.random.default_rng(3).random((2, 11, 3)) < 0.6)
    s = jax.jit(routing.slots, static_argnums=1)(take, 4)
    for b in range(2):
        for e in range(3):
            rows = np.flatnonzero(np.asarray(take[b, :, e]))[:4]
            np.testing.assert_array_equal(np.asarray(s.row_BxExC[b, e])[np.asarray(s.valid_BxExC[b, e])], rows)
            np.testing.assert_array_equal(np.flatnonzero(np.asarray(s.kept_BxTxE[b, :, e])), rows)


# ---- all experts selected == the dense block ----------------------------------------------------------

@pytest.mark.parametrize("routing_mode,num_experts", [("expert_selection", 4), ("patch_selection", 2)])
def test_every_expert_selected_is_dense_attention(routing_mode, num_experts):
    """top_k = E, capacity_factor 1: every expert takes every token; `attention` with the same
    weights (a head per expert, or two sharing a key/value head), on one sequence per row and on
    packed documents."""
    uoe = build("attention", routing_mode, num_experts=num_experts, top_k=num_experts)
    dense = Attention(AttentionConfig().bind(TINY_SHAPE), rngs=nnx.Rngs(1))
    for name in ("w_q", "w_k", "w_v", "w_o"):
        getattr(dense, name)[...] = getattr(uoe, name)[...]
    uoe, dense = jitted(uoe), jitted(dense)
    x = inputs()
    segment_ids = jnp.asarray([[1] * 8 + [2] * 5, [3] * 13], jnp.int32)
    positions = jnp.asarray([list(range(8)) + list(range(5)), list(range(13))], jnp.int32)
    assert scale_error(uoe(x), dense(x)) <= LAW
    packed = dict(segment_ids=segment_ids, positions=positions)
    assert scale_error(uoe(x, **packed), dense(x, **packed)) <= LAW


@pytest.mark.parametrize("routing_mode", ROUTINGS)
def test_every_expert_selected_is_dense_swiglu(routing_mode):
    uoe = build("mlp", routing_mode, top_k=4)
    E, D, F = 4, TINY_SHAPE.d_model, TINY_SHAPE.mlp_hidden // 4
    dense = SwiGLU(MLPConfig(d_model=D, hidden=E * F), rngs=nnx.Rngs(1))
    dense.w_gate[...] = jnp.swapaxes(uoe.w_gate[...], 0, 1).reshape(D, E * F)    # expert e: columns e
    dense.w_up[...] = jnp.swapaxes(uoe.w_up[...], 0, 1).reshape(D, E * F)
    dense.w_down[...] = uoe.w_down[...].reshape(E * F, D)                         # expert e: rows e
    x = inputs()
    assert scale_error(jitted(uoe)(x), jitted(dense)(x)) <= LAW


# ---- causality, decoding ----------------------------------------------------------------------------------

CASES = [(layer, mode) for layer in LAYERS for mode in ROUTINGS]


@functools.cache
def forward(layer: str, routing_mode: str, training: bool):
    """The layer of `build` and its jitted forward x -> (y, losses, metrics), in training or
    evaluation mode (one compiled program per case, shared by the tests)."""
    module = build(layer, routing_mode)
    if training:
        module.train()
    call = nnx.jit(forward_with_auxiliaries)
    return module, lambda x: call(module, x)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("layer,routing_mode", CASES)
def test_causal_by_perturbation(layer, routing_mode, training):
    """Replacing x from s on leaves y before s bit-for-bit unchanged, for every s, with budgets that
    refuse offers (checked through the training-mode metric)."""
    _, call = forward(layer, routing_mode, training)
    x = np.asarray(inputs(seed=1))
    y, _, metrics = call(jnp.asarray(x))
    y = np.asarray(y)
    if training and routing_mode == "patch_selection":
        assert float(metrics["dropped_fraction"]) > 0
    for s in range(1, T):
        changed = x.copy()
        changed[:, s:] = 2.0 * np.random.default_rng(s).normal(size=changed[:, s:].shape)
        got = np.asarray(call(jnp.asarray(changed))[0])
        np.testing.assert_array_equal(got[:, :s], y[:, :s], err_msg=f"{layer} {routing_mode}: y before s={s} moved")
        assert scale_error(got[:, s], y[:, s]) > 1e-3


@pytest.mark.parametrize("layer,routing_mode", CASES)
def test_decoding_token_by_token_equals_the_parallel_form(layer, routing_mode):
    module, call = forward(layer, routing_mode, False)
    decode = jitted(module)
    x = inputs(seed=2)
    full = call(x)[0]
    schedules = [(1,) * T] + [(5, 1, 1, 1, 5)] * (routing_mode == "patch_selection")   # chunks across patches
    for chunks in schedules:
        cache, outputs, start = module.init_cache(2, T + 3), [], 0
        for n in chunks:
            y, cache = decode(x[:, start:start + n], cache=cache)
            outputs.append(y)
            start += n
        assert scale_error(jnp.concatenate(outputs, axis=1), full) <= 1e-5, (layer, routing_mode, chunks)


def test_patch_selection_mlp_packed_documents_equal_them_alone():
    call = jitted(build("mlp", "patch_selection"))
    x = inputs(seed=5)
    segment_ids = jnp.asarray([[1] * 8 + [2] * 5, [7] * 13], jnp.int32)
    positions = jnp.asarray([list(range(8)) + list(range(5)), list(range(13))], jnp.int32)
    y = call(x, segment_ids=segment_ids, positions=positions)
    assert scale_error(y[0, 8:], call(x[:1, 8:])[0]) <= 1e-5          # the second document, as if alone
    assert scale_error(y[:, :8], call(x[:, :8])) <= 1e-5              # the first, and row 1's start


# ---- budgets -------------------------------------------------------------------------------------

def test_num_params_match_the_built_model():
    config = ModelConfig(d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, mixers=["uoe_attention"],
                         ffns=["uoe_mlp"], uoe_attention={"top_k": 1}, uoe_mlp={"num_experts": 8, "top_k": 2})
    model = nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0)))
    assert config.num_params() == sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    attention, mlp = config.layer_configs()[0]
    D, Dh, F = 32, 8, config.shape().mlp_hidden
    assert attention.num_params() == D * Dh * (2 * 4 + 2 * 2) + D * 4
    assert attention.num_active_params() == D * 4 + 2 * D * Dh * 2 + 2 * D * Dh * 1
    assert mlp.num_params() == D * 8 + 3 * D * F
    assert mlp.num_active_params() == D * 8 + 3 * D * (F // 8) * 2
    for layer in LAYERS:
        for mode in ROUTINGS:
            module = nnx.eval_shape(lambda: build(layer, mode))
            assert module.config.num_params() == sum(v.size for v in jax.tree.leaves(nnx.state(module, nnx.Param)))


FLOPS_SHAPE = ModelShape()   # the quickstart's width (conformance.FLOPS_SHAPE): elementwise work is small there


@pytest.mark.parametrize("layer,routing_mode", CASES)
def test_flops_per_token_matches_xla_cost_analysis(layer, routing_mode):
    """Within 5% at length 128 (and 13 for patches of 16 in attention: one partial patch; the
    registered expert_selection is also checked at 13 by the conformance suite). Dropless
    expert_selection of the MLP runs XLA:CPU's grouped matmul, which XLA counts at its largest padded
    capacity (pallas_kernels/grouped_matmul/xla.py): that padding is added to the formula (the
    active experts) before comparing."""
    config_class, module_class = LAYERS[layer]
    settings = {"top_k": 2, "capacity_factor": 1.0, "patch_size": 16, "routing": routing_mode}
    config = config_class(**settings).bind(FLOPS_SHAPE)
    for length in (13, 128) if (layer, routing_mode) == ("attention", "patch_selection") else (128,):
        formula = config.flops_per_token(length)
        if layer == "mlp" and routing_mode == "expert_selection":
            rows, groups = 2 * length * config.top_k, config.num_experts
            expert = 2 * 3 * config.d_model * config.expert_hidden
            formula += expert * (groups * max(plan(rows, groups).capacities) - rows) // (2 * length)
        xla = conformance.xla_flops_per_token(config, module_class, length)
        assert 0.95 <= formula / xla <= 1.05, f"{layer} {routing_mode} T={length}: {formula:,} vs XLA {xla:,.0f}"


def test_capacity_counts_active_units_only():
    """rho = 1/2 of 16-token patches at T = 128: 4 of 8 patches per expert, so the attention part
    of the FLOPs is half the dense one's."""
    config = SelectiveAttentionConfig(top_k=2, capacity_factor=1.0, patch_size=16,
                                      routing="patch_selection").bind(FLOPS_SHAPE)
    dense = AttentionConfig().bind(FLOPS_SHAPE)
    assert config.slots(128) == 64 and config.slots(13) == 13
    D, Dh, H = 256, 64, 4
    kv = 2 * 2 * D * Dh * H
    assert config.flops_per_token(128) - 2 * D * 4 - kv == (dense.flops_per_token(128) - kv) // 2


# ---- training mode ---------------------------------------------------------------------------------

@pytest.mark.parametrize("layer,routing_mode", CASES)
def test_training_mode_reports_balance_and_load(layer, routing_mode):
    """The reported numbers, from the layer's own routing; nothing in evaluation mode."""
    x = inputs(seed=4)
    assert forward(layer, routing_mode, False)[1](x)[1:] == ({}, {})
    module, call = forward(layer, routing_mode, True)
    _, losses, metrics = call(x)
    c = module.config

    @jax.jit
    def expected_routing(x):
        logits = module.router_logits(x)
        if layer == "mlp" and routing_mode == "expert_selection":
            offers = routing.top_k_offers(jax.nn.softmax(logits, axis=-1), c.top_k)
            return logits, jnp.ones(x.shape[:2], bool), offers, offers
        document, start, index = routing.units(jnp.broadcast_to(jnp.arange(T), x.shape[:2]), None, c.unit)
        choice = routing.choose(logits, document, start, index, top_k=c.top_k, rate=c.rate())
        return logits, start, choice.offer_BxTxE, routing.slots(choice.take_BxTxE, c.slots(T)).kept_BxTxE

    logits, start, offers, ran = expected_routing(x)
    counts = np.asarray(ran).sum((0, 1))
    np.testing.assert_allclose(metrics["load"], counts / counts.sum(), rtol=1e-6)
    np.testing.assert_allclose(metrics["dropped_fraction"], 1 - counts.sum() / np.asarray(offers).sum(), rtol=1e-6)
    unit = np.asarray(start)
    f = np.asarray(offers)[unit].sum(0) / np.asarray(offers)[unit].sum()
    p = np.asarray(jax.nn.softmax(logits, axis=-1))[unit].mean(0)
    np.testing.assert_allclose(losses["balance_loss"], c.balance_loss_weight * 4 * np.dot(f, p), rtol=1e-5)


@pytest.mark.parametrize("layer,routing_mode", [("attention", "patch_selection"), ("mlp", "expert_selection")])
def test_router_learns_through_the_straight_through_gate(layer, routing_mode):
    """The gate's value is 1, yet the output's gradient reaches the router (the two gate paths: a
    patch's score read at its first token; dropless top_k weights)."""
    graphdef, params = nnx.split(build(layer, routing_mode), nnx.Param)
    x = inputs(seed=6)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(x) ** 2)))(params)
    assert float(jnp.max(jnp.abs(grads["router"][...]))) > 1e-4


# ---- in a model, and the errors -----------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("mlp_routing", ["expert_selection", "patch_selection"])
def test_model_with_uoe_layers_decodes_like_its_parallel_form(mlp_routing):
    """uoe_attention by patches (its cache carries the routing state); uoe_mlp by expert selection
    (stateless) or by patches (a stateful FFN: the block keeps its routing cache beside the mixer's)."""
    config = ModelConfig(d_model=32, num_layers=1, num_heads=4, mixers=["uoe_attention"], ffns=["uoe_mlp"],
                         uoe_attention={"routing": "patch_selection", "patch_size": 4, "capacity_factor": 1.0},
                         uoe_mlp={"num_experts": 4, "top_k": 2, "routing": mlp_routing, "patch_size": 3})
    model = CausalLM(config, rngs=nnx.Rngs(0))
    call = jitted(model)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 256, size=(2, 11)), jnp.int32)
    full = call(tokens)
    cache = model.init_cache(2, 11)
    prefill, cache = call(tokens[:, :5], cache=cache)
    steps = [prefill]
    for t in range(5, 11):
        logits, cache = call(tokens[:, t:t + 1], cache=cache)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=2e-5)


@pytest.mark.parametrize("section,settings,message", [
    ("uoe_attention", {"top_k": 5}, "model.uoe_attention: top_k=5 must be in [1, num_experts=4]"),
    ("uoe_attention", {"num_experts": 3}, "num_experts=3 does not divide num_heads=4"),
    ("uoe_attention", {"routing": "expert_choice"}, "routing='expert_choice' is not one of"),
    ("uoe_attention", {"capacity_factor": 0.0}, "capacity_factor=0.0 > 0"),
    ("uoe_mlp", {"num_experts": 5}, "num_experts=5 does not divide hidden=704"),
    ("uoe_mlp", {"num_experts": 4, "top_k": 6}, "top_k=6 must be in [1, num_experts=4]"),
    ("uoe_mlp", {"patch_size": 0}, "patch_size=0 must be >= 1"),
])
def test_bad_settings_are_one_line_errors(section, settings, message):
    kind = "mixers" if section == "uoe_attention" else "ffns"
    with pytest.raises(ValueError) as refusal:
        ModelConfig(**{kind: [section], section: settings})
    [error] = refusal.value.errors()
    assert message in error["msg"] and "\n" not in error["msg"], error["msg"]


# ---- the patch_selection mixer through the whole contract (the registered one is expert_selection) ------

class PatchSelectionConfig(SelectiveAttentionConfig):
    tiny: ClassVar[dict] = {**SelectiveAttentionConfig.tiny, "routing": "patch_selection"}


PATCHES = (PatchSelectionConfig, SelectiveAttention)
REGISTER = "\n".join([
    "from typing import ClassVar",
    "from hybrax.layers.moe.selective_attention import SelectiveAttention, SelectiveAttentionConfig",
    "class PatchSelectionConfig(SelectiveAttentionConfig):",
    "    tiny: ClassVar[dict] = {**SelectiveAttentionConfig.tiny, 'routing': 'patch_selection'}",
    "conformance.MIXERS.register('uoe_attention_patches', PatchSelectionConfig, SelectiveAttention)"])


@pytest.mark.slow
def test_patch_selection_attention_conforms():
    conformance.check_all(PATCHES)


@pytest.mark.slow
@pytest.mark.multi_device
def test_patch_selection_attention_sharded_equals_one_device():
    name = "uoe_attention_patches"
    conformance.assert_sharded(name, conformance.run_sharded([name], setup=REGISTER)[name])
