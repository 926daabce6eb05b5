"""Mixture-of-experts FFN: dropless and capacity dispatch against the every-expert reference
(outputs and gradients), exact drops, the balance-loss scopes on a constructed example and through
the train step, the z-loss, auxiliary-loss-free bias balancing, metrics and the parameter counts."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybrax.arch import CausalLM, ModelConfig
from hybrax.layers.auxiliary import forward_with_auxiliaries
from hybrax.layers.moe import MoE, MoEConfig
from hybrax.layers.moe import balancing
from hybrax.layers.moe.capacity import slots
from hybrax.layers.moe.reference import routed_output


def make(**kw) -> MoE:
    base = dict(d_model=32, num_experts=4, top_k=2, expert_hidden=16)
    return MoE(MoEConfig(**{**base, **kw}), rngs=nnx.Rngs(0))


def inputs(B=2, T=37, D=32, seed=1):
    return jax.random.normal(jax.random.key(seed), (B, T, D), jnp.float32)


def reference_forward(moe: MoE, x_BxTxD, drop_mask_BxTxK=None):
    """The layer's own routing, then every expert on every token (and the shared experts)."""
    B, T, D = x_BxTxD.shape
    r = moe.routing(x_BxTxD.reshape(B * T, D))
    weights = r.weights_NxK
    if drop_mask_BxTxK is not None:
        weights = jnp.where(drop_mask_BxTxK.reshape(B * T, -1), weights, 0.0)
    y = routed_output(x_BxTxD.reshape(B * T, D), r.experts_NxK, weights, moe.w_gate[...], moe.w_up[...],
                      moe.w_down[...]).reshape(B, T, D)
    if moe.shared is not None:
        y = y + moe.shared(x_BxTxD)
    return y


def value_and_grads(fn, moe, x):
    """fn(moe, x) . cotangent, and its gradients with respect to x and every parameter."""
    graphdef, params, rest = nnx.split(moe, nnx.Param, ...)
    cot = jax.random.normal(jax.random.key(7), x.shape, jnp.float32)

    def scalar(params, x):
        return jnp.sum(fn(nnx.merge(graphdef, params, rest), x).astype(jnp.float32) * cot)

    return jax.jit(jax.value_and_grad(scalar, argnums=(0, 1)))(params, x)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def assert_close_tree(tree_a, tree_b, tol):
    for a, b in zip(jax.tree.leaves(tree_a), jax.tree.leaves(tree_b)):
        assert rel(a, b) <= tol, rel(a, b)


@pytest.mark.parametrize("kw", [
    dict(),
    dict(score="sigmoid", num_shared_experts=1),
    dict(renormalize=False, top_k=1, num_experts=5),
    dict(top_k=3, num_experts=8, num_shared_experts=2),
])
def test_dropless_equals_every_expert_reference(kw):
    moe, x = make(**kw), inputs()
    v, (gp, gx) = value_and_grads(lambda m, x: m(x), moe, x)
    v_ref, (gp_ref, gx_ref) = value_and_grads(reference_forward, moe, x)
    assert rel(v, v_ref) <= 1e-5
    assert rel(moe(x), reference_forward(moe, x)) <= 1e-5
    assert rel(gx, gx_ref) <= 1e-5
    assert_close_tree(gp, gp_ref, 1e-5)


def test_dropless_handles_all_tokens_on_one_expert():
    """A router that sends every token to experts 0 and 1: nothing is dropped."""
    moe = make()
    moe.expert_bias[...] = jnp.array([100.0, 50.0, 0.0, 0.0])   # selection only
    x = inputs()
    assert set(np.unique(moe.routing(x.reshape(-1, 32)).experts_NxK)) == {0, 1}
    assert rel(moe(x), reference_forward(moe, x)) <= 1e-5


def test_capacity_equals_dropless_when_nothing_overflows():
    x = inputs()
    big = make(dispatch="capacity", capacity_factor=2.0)   # C = T k / E * 2 = T: no expert can overflow
    dropless = make()
    assert big.config.capacity(37) == 37
    assert rel(big(x), dropless(x)) <= 1e-5
    _, (gp_cap, gx_cap) = value_and_grads(lambda m, x: m(x), big, x)
    _, (gp_drop, gx_drop) = value_and_grads(lambda m, x: m(x), dropless, x)
    assert rel(gx_cap, gx_drop) <= 1e-5
    assert_close_tree(gp_cap, gp_drop, 1e-5)


def priority_kept(experts_TxK: np.ndarray, num_experts: int, capacity: int) -> np.ndarray:
    """Independent loop: first choices before second choices, then token order."""
    T, K = experts_TxK.shape
    used = np.zeros(num_experts, int)
    kept = np.zeros((T, K), bool)
    for j in range(K):
        for t in range(T):
            e = experts_TxK[t, j]
            kept[t, j] = used[e] < capacity
            used[e] += 1
    return kept


def test_capacity_drops_exactly_the_overflow():
    moe = make(dispatch="capacity", capacity_factor=1.0)
    moe.expert_bias[...] = jnp.array([3.0, 0.0, 0.0, 0.0])     # skew the load toward expert 0
    x = inputs()
    B, T, D = x.shape
    C = moe.config.capacity(T)
    assert C == math.ceil(T * 2 / 4)
    experts = np.asarray(moe.routing(x.reshape(B * T, D)).experts_NxK).reshape(B, T, 2)
    kept = np.stack([priority_kept(e, 4, C) for e in experts])
    assert not kept.all()                                       # the example does overflow
    np.testing.assert_array_equal(np.asarray(jax.vmap(lambda e: slots(e, 4))(experts)) < C, kept)
    assert rel(moe(x), reference_forward(moe, x, jnp.asarray(kept))) <= 1e-5
    moe.train()
    _, _, metrics = forward_with_auxiliaries(moe, x)
    np.testing.assert_allclose(metrics["dropped_fraction"], 1.0 - kept.mean(), rtol=1e-6)


def test_switch_loss_scopes_on_a_constructed_example():
    """Two micro-batches of 4 tokens, E = 2, top-1: micro-batch 1 sends everything to expert 0,
    micro-batch 2 splits evenly. Hand-computed f and p give the micro and global losses."""
    experts_1 = np.array([[0], [0], [0], [0]])
    experts_2 = np.array([[0], [1], [0], [1]])
    p_1 = np.array([0.8, 0.2])      # mean router probabilities of each micro-batch
    p_2 = np.array([0.5, 0.5])
    micro_1 = float(balancing.switch_loss(balancing.assignment_counts(jnp.asarray(experts_1), 2), jnp.asarray(p_1)))
    micro_2 = float(balancing.switch_loss(balancing.assignment_counts(jnp.asarray(experts_2), 2), jnp.asarray(p_2)))
    np.testing.assert_allclose(micro_1, 2 * (1.0 * 0.8 + 0.0 * 0.2), rtol=1e-6)   # 1.6
    np.testing.assert_allclose(micro_2, 2 * (0.5 * 0.5 + 0.5 * 0.5), rtol=1e-6)   # 1.0
    # global: f = (6/8, 2/8) over both micro-batches; each micro-batch's p times the global f
    global_counts = balancing.assignment_counts(jnp.asarray(np.concatenate([experts_1, experts_2])), 2)
    global_1 = float(balancing.switch_loss(global_counts, jnp.asarray(p_1)))
    global_2 = float(balancing.switch_loss(global_counts, jnp.asarray(p_2)))
    np.testing.assert_allclose(global_1, 2 * (0.75 * 0.8 + 0.25 * 0.2), rtol=1e-6)   # 1.3
    np.testing.assert_allclose(global_2, 2 * (0.75 * 0.5 + 0.25 * 0.5), rtol=1e-6)   # 1.0
    # the mean over the accumulation steps is E sum f_global p_global; the micro mean is larger here
    np.testing.assert_allclose((global_1 + global_2) / 2, 2 * np.dot([0.75, 0.25], (p_1 + p_2) / 2), rtol=1e-6)
    assert (micro_1 + micro_2) / 2 > (global_1 + global_2) / 2
    # sequence scope: each row alone
    seq = balancing.sequence_switch_loss(jnp.asarray(np.stack([experts_1, experts_2])),
                                         jnp.asarray(np.stack([np.tile(p_1, (4, 1)), np.tile(p_2, (4, 1))])))
    np.testing.assert_allclose(float(seq), (micro_1 + micro_2) / 2, rtol=1e-6)


def test_switch_loss_is_one_at_uniform_load():
    counts = jnp.full((8,), 5.0)
    np.testing.assert_allclose(balancing.switch_loss(counts, jnp.full((8,), 1 / 8)), 1.0, rtol=1e-6)


def test_z_loss_formula():
    logits = jnp.array([[0.0, 0.0], [math.log(3.0), 0.0]])
    expected = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    np.testing.assert_allclose(balancing.z_loss(logits), expected, rtol=1e-6)


def test_training_mode_reports_weighted_losses_and_load():
    moe = make(balance_loss_weight=0.1, z_loss_weight=0.01, num_shared_experts=1)
    x = inputs()
    _, losses, metrics = forward_with_auxiliaries(moe, x)
    assert losses == {} and metrics == {}                      # evaluation mode reports nothing
    moe.train()
    _, losses, metrics = forward_with_auxiliaries(moe, x)
    r = moe.routing(x.reshape(-1, 32))
    counts = np.bincount(np.asarray(r.experts_NxK).ravel(), minlength=4)
    f = counts / counts.sum()
    np.testing.assert_allclose(metrics["load"], f, rtol=1e-6)
    np.testing.assert_allclose(metrics["imbalance"], counts.max() / counts.mean(), rtol=1e-6)
    np.testing.assert_allclose(losses["balance_loss"], 0.1 * 4 * np.dot(f, np.asarray(r.probs_NxE).mean(0)), rtol=1e-5)
    lse = jax.nn.logsumexp(r.logits_NxE, axis=-1)
    np.testing.assert_allclose(losses["router_z_loss"], 0.01 * np.mean(np.square(lse)), rtol=1e-5)


def test_bias_update_moves_a_skewed_router_toward_uniform_load():
    """Inputs with a common direction and a router aligned with it favour experts 0 and 1 for
    almost every token (max/mean load near 2, the most top-2 of 4 allows); the auxiliary-loss-free
    bias brings max/mean load close to 1 while the router weights stay fixed."""
    moe = make(bias_update_rate=0.003, balance_loss_weight=0.0)
    moe.router[...] = moe.router[...].at[:, 0].add(0.05).at[:, 1].add(0.03)
    x = inputs(B=4, T=64) + 1.0
    moe.train()

    @nnx.jit
    def step(moe, x):
        _, _, metrics = forward_with_auxiliaries(moe, x)
        return metrics["imbalance"]

    start = float(step(moe, x))
    history = [float(step(moe, x)) for _ in range(200)]
    assert start > 1.8
    assert max(history[-20:]) < 1.1, history[-20:]   # sign steps settle within one step of the target
    bias = np.asarray(moe.expert_bias[...])
    assert bias[0] == bias.min()                                # the favoured expert is held back


@pytest.mark.slow
def test_global_scope_with_accumulation_equals_one_batch_and_micro_does_not():
    from hybrax.train.config import DataConfig, OptimConfig
    from hybrax.train.data import build_datasets
    from hybrax.train.optim import learning_rate_schedule, make_optimizer
    from hybrax.train.step import create_model, init_state, make_train_step

    def run(scope, grad_accum):
        model = ModelConfig(d_model=32, num_layers=2, num_heads=2, ffns=["moe"],
                            moe=dict(num_experts=4, expert_hidden=16, balance_scope=scope, balance_loss_weight=0.1))
        optim = OptimConfig(lr=1e-2, warmup_steps=1)
        optimizer = make_optimizer(optim, 10)
        graphdef, state = init_state(create_model(model, 0), optimizer)
        step = make_train_step(graphdef, optimizer, learning_rate_schedule(optim, 10), grad_accum)
        state, metrics = step(state, next(build_datasets(DataConfig(seq_len=32, batch_size=8), seed=0).train))
        return state, float(metrics["aux_loss"])

    one, aux_one = run("global", 1)
    four, aux_four = run("global", 4)
    np.testing.assert_allclose(aux_four, aux_one, rtol=1e-5)
    assert_close_tree(four.params, one.params, 1e-5)
    _, aux_micro = run("micro", 4)
    assert abs(aux_micro - aux_one) > 1e-4    # per-micro-batch counts give another loss


def test_param_counts_total_and_active():
    config = ModelConfig(d_model=32, num_layers=4, num_heads=2, ffns=["swiglu", "moe"],
                         moe=dict(num_experts=6, top_k=2, expert_hidden=24, num_shared_experts=1))
    model = CausalLM(config, rngs=nnx.Rngs(0))
    assert config.num_params() == sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    moe_layer = config.layer_configs()[1][1]
    unused_experts = 6 - 2
    assert config.num_params() - config.num_active_params() == 2 * unused_experts * 3 * 32 * 24
    assert moe_layer.flops_per_token(128) == 2 * (32 * 6 + (2 + 1) * 3 * 32 * 24)


@pytest.mark.parametrize("moe,message", [
    (dict(top_k=9), "model.moe: top_k=9 must be in [1, num_experts=8]"),
    (dict(capacity_factor=0.0), "capacity_factor=0.0 must be > 0"),
    (dict(bias_update_rate=-1.0), "bias_update_rate=-1.0 must be >= 0"),
])
def test_bad_moe_config_is_refused(moe, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        ModelConfig(ffns=["moe"], moe=moe)


def test_flops_per_token_matches_xla_cost_analysis():
    """Capacity mode at capacity_factor 1 computes exactly T k slots per row, so XLA's count is the
    router and the active experts (the formula) plus the dispatch and combine einsums, 2 E C D
    FLOPs per token each (the one-hot products are a further T k E C / T per token: < 1%)."""
    T, D, E, k = 128, 256, 8, 2
    config = MoEConfig(d_model=D, num_experts=E, top_k=k, expert_hidden=256, num_shared_experts=1,
                       dispatch="capacity", capacity_factor=1.0)
    moe = MoE(config, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(moe)
    x = jnp.zeros((2, T, D), jnp.float32)
    analysis = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, x).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    C = config.capacity(T)
    assert E * C == T * k
    expected = config.flops_per_token(T) + 2 * (2 * E * C * D)
    np.testing.assert_allclose(analysis["flops"] / (2 * T), expected, rtol=0.01)
