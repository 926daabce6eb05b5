"""The mixture-of-experts FFN: a float32 top-k router over E SwiGLU experts (plus optional shared
experts that every token uses), dispatched dropless (sorted grouped matmuls) or with a capacity
(einsums, overflow dropped); experts are sharded over the mesh axis `expert` when there is one.

In training mode (`model.train()`) the layer reports, through layers/auxiliary:
- losses `balance_loss` (the switch loss at `balance_scope`, weighted) and `router_z_loss`;
- metrics `load` (each expert's share of the assignments, a vector [E]: a histogram in
  TensorBoard), `imbalance` (max load / mean load) and, in capacity mode, `dropped_fraction`;
and moves its `expert_bias` (RouterState) when `bias_update_rate` > 0.

Global-batch balancing needs the expert counts of the whole batch before the loss: the train step
runs a statistics pass over all micro-batches (`batch_statistics = "collect"`: the layer adds its
counts to `batch_counts`, a BatchStatistic, and reports nothing), then the gradient pass with
`batch_statistics = "use"`. Outside that ("own") the call's own tokens are the batch.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from hybrax.layers.auxiliary import BatchStatistic, RouterState, report_loss, report_metric
from hybrax.layers.mlp import MLPConfig, SwiGLU
from hybrax.layers.moe import balancing, expert_parallel
from hybrax.layers.moe.capacity import capacity
from hybrax.layers.moe.config import MoEConfig
from hybrax.layers.moe.dropless import dropless
from hybrax.layers.moe.router import Routing, route
from hybrax.layers.parameters import logical_param, normal

BATCH_STATISTICS_MODES = ("own", "collect", "use")


def declare_experts(module: nnx.Module, c, rngs: nnx.Rngs) -> None:
    """The router [D, E] and E SwiGLU experts of width F (w_gate, w_up [E, D, F], w_down [E, F, D]),
    with their logical axes; `c` has num_experts, d_model, expert_hidden, init_std, param_dtype."""
    E, D, F = c.num_experts, c.d_model, c.expert_hidden
    init = normal(c.init_std)
    module.router = logical_param(rngs, init, (D, E), c.param_dtype, ("embed", "experts"))
    module.w_gate = logical_param(rngs, init, (E, D, F), c.param_dtype, ("experts", "embed", "mlp"))
    module.w_up = logical_param(rngs, init, (E, D, F), c.param_dtype, ("experts", "embed", "mlp"))
    module.w_down = logical_param(rngs, init, (E, F, D), c.param_dtype, ("experts", "mlp", "embed"))


class MoE(nnx.Module):
    def __init__(self, config: MoEConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        E, D, F = c.num_experts, c.d_model, c.expert_hidden
        declare_experts(self, c, rngs)
        # S shared experts of width F = one SwiGLU of width S F
        self.shared = nnx.data(SwiGLU(MLPConfig(d_model=D, hidden=c.num_shared_experts * F, init_std=c.init_std, dtype=c.dtype,
                                                param_dtype=c.param_dtype),
                                      rngs=rngs) if c.num_shared_experts else None)
        self.expert_bias = RouterState(jnp.zeros((E,), jnp.float32))
        self.batch_counts = BatchStatistic(jnp.zeros((E,), jnp.float32))
        self.deterministic = True
        self.batch_statistics = "own"

    def routing(self, x_NxD: jax.Array) -> Routing:
        c = self.config
        logits_NxE = jnp.einsum("nd,de->ne", x_NxD.astype(jnp.float32), self.router[...].astype(jnp.float32))
        return route(logits_NxE, self.expert_bias[...], score=c.score, top_k=c.top_k, renormalize=c.renormalize)

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        c = self.config
        B, T, D = x_BxTxD.shape
        K = c.top_k
        r = self.routing(x_BxTxD.reshape(B * T, D))
        experts = (self.w_gate[...], self.w_up[...], self.w_down[...])
        kept_BxTxK = None
        if c.dispatch == "dropless":
            x_NxD = x_BxTxD.reshape(B * T, D)
            if expert_parallel.expert_axis_size() > 1:
                y_NxD = expert_parallel.dropless(x_NxD, r.experts_NxK, r.weights_NxK, *experts, dtype=c.dtype,
                                                 implementation=c.implementation, exchange=c.exchange)
            else:
                y_NxD = dropless(x_NxD, r.experts_NxK, r.weights_NxK, *experts, dtype=c.dtype,
                                 implementation=c.implementation)
            y_BxTxD = y_NxD.reshape(B, T, D)
        else:
            y = expert_parallel.capacity if expert_parallel.expert_axis_size() > 1 else capacity
            y_BxTxD, kept_BxTxK = y(x_BxTxD, r.experts_NxK.reshape(B, T, K), r.weights_NxK.reshape(B, T, K),
                                    *experts, capacity=c.capacity(T), dtype=c.dtype)
        if self.shared is not None:
            y_BxTxD = y_BxTxD + self.shared(x_BxTxD).astype(jnp.float32)
        if not self.deterministic:
            self._balance(r, kept_BxTxK, B, T)
        return y_BxTxD.astype(c.dtype)

    def _balance(self, r: Routing, kept_BxTxK, B: int, T: int) -> None:
        c = self.config
        E, K = c.num_experts, c.top_k
        counts_E = balancing.assignment_counts(r.experts_NxK, E)
        if self.batch_statistics not in BATCH_STATISTICS_MODES:
            raise ValueError(f"batch_statistics={self.batch_statistics!r} must be one of {BATCH_STATISTICS_MODES}")
        if self.batch_statistics == "collect":      # statistics pass of the train step: count, nothing else
            self.batch_counts[...] = self.batch_counts[...] + counts_E
            return
        if c.balance_loss_weight:
            if c.balance_scope == "sequence":
                loss = balancing.sequence_switch_loss(r.experts_NxK.reshape(B, T, K), r.probs_NxE.reshape(B, T, E))
            else:
                use_batch = c.balance_scope == "global" and self.batch_statistics == "use"
                f_counts_E = self.batch_counts[...] if use_batch else counts_E
                loss = balancing.switch_loss(f_counts_E, jnp.mean(r.probs_NxE, axis=0))
            report_loss(self, "balance_loss", c.balance_loss_weight * loss)
        if c.z_loss_weight:
            report_loss(self, "router_z_loss", c.z_loss_weight * balancing.z_loss(r.logits_NxE))
        report_metric(self, "load", counts_E / jnp.sum(counts_E))
        report_metric(self, "imbalance", balancing.imbalance(counts_E))
        if kept_BxTxK is not None:
            report_metric(self, "dropped_fraction", 1.0 - jnp.mean(kept_BxTxK.astype(jnp.float32)))
        if c.bias_update_rate:
            self.expert_bias[...] = balancing.updated_bias(self.expert_bias[...], counts_E, c.bias_update_rate)
