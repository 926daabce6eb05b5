"""Union-of-MLP-Experts (UoME), the MLP half of Union of Experts (Yang et al., 2025): a SwiGLU of
hidden width F cut along its hidden axis into E experts of width F / E,

    y = W_down(silu(x W_gate) * (x W_up)) = sum_e W_down[e](silu(x W_gate[:, e]) * (x W_up[:, e]))

(expert e owns columns e of W_gate and W_up and rows e of W_down, the tensor-parallel split), so
the sum of all experts' outputs IS the dense SwiGLU. A token runs on the experts that took it, with
the straight-through gate g (value 1; layers/moe/union_routing.py):

- expert_selection: the token's top_k experts, all of them (dropless): the sorted grouped matmuls of
  the MoE layer (layers/moe/dropless.py, expert_parallel.py under a mesh axis `expert`). It depends
  on the token alone, so it needs no state and decodes as it trains.
- patch_selection: the experts take patches (the first token's top_k offers, each expert in order of
  position under its running budget), into C token slots per row (union_routing.slots), run as
  batched einsums over the slots. The choice of a token depends on its patch's first token and on
  earlier patches, so it needs positions and, when decoding, a cache of the routing state: the layer
  takes `segment_ids`, `positions` and `cache` (from `init_cache`) as a mixer does and returns
  (y, cache) when given one; arch/block.py calls it so (a stateful FFN: it has `init_cache`) and
  keeps its cache beside the mixer's. Without them each call is one sequence per row in natural
  order (zigzag-aware under seq > 1).

Parameters: router d_model E + 3 d_model F. Active per token: router + top_k experts (3 d_model F / E each).
"""

from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx
from pydantic import model_validator

from hybrax.layers.config import DType, Implementation, ModelShape
from hybrax.layers.moe import expert_parallel
from hybrax.layers.moe import union_routing as routing
from hybrax.layers.moe.capacity import expert_ffn_slots
from hybrax.layers.moe.dropless import dropless
from hybrax.layers.moe.layer import declare_experts
from hybrax.layers.sequence_parallel.layout import from_zigzag, seq_size, to_zigzag


class UnionMLPConfig(routing.UnionRoutingConfig):
    """Parameter budget: d_model E + 3 d_model F. Active per token: d_model E + 3 d_model F top_k / E."""

    kernel: ClassVar[str] = "grouped_matmul"
    tiny: ClassVar[dict] = {"num_experts": 4, "patch_size": 4}

    d_model: int = 256
    hidden: int | None = None           # F, the dense SwiGLU's width, cut into E experts (None: model.mlp_hidden)
    num_experts: int = 8                # E; each expert is F / E hidden units wide
    init_std: float = 0.02
    implementation: Implementation = None   # grouped_matmul implementation of expert_selection (unset: model.kernels)
    dtype: DType = "float32"
    param_dtype: DType = "float32"

    def derived(self, shape: ModelShape) -> dict:
        return {"hidden": shape.mlp_hidden}

    @model_validator(mode="after")
    def _check_width(self):
        if self.hidden is not None and self.hidden % self.num_experts:
            raise ValueError(f"num_experts={self.num_experts} does not divide hidden={self.hidden}")
        return self

    @property
    def expert_hidden(self) -> int:
        return self.hidden // self.num_experts

    def num_params(self) -> int:
        return self.d_model * self.num_experts + 3 * self.d_model * self.hidden

    def num_active_params(self) -> int:
        return self.d_model * self.num_experts + 3 * self.d_model * self.expert_hidden * self.top_k

    def flops_per_token(self, seq_len: int) -> int:
        """Forward matmul FLOPs per token: the router and the experts that run, top_k per token in
        expert_selection (dropless; XLA:CPU's grouped matmul computes padded groups on top, see
        pallas_kernels/grouped_matmul/xla.py), E C / seq_len slots per token in patch_selection.
        The gathers and the combine (2 E d_model) are not counted."""
        expert = 2 * 3 * self.d_model * self.expert_hidden
        router = 2 * self.d_model * self.num_experts
        if self.routing == "expert_selection":
            return router + self.top_k * expert
        return router + self.num_experts * self.slots(seq_len) * expert // seq_len


class UnionMLP(nnx.Module):
    def __init__(self, config: UnionMLPConfig, *, rngs: nnx.Rngs):
        self.config = config
        declare_experts(self, config, rngs)   # the MoE layer's router and experts, same shapes and axes
        self.deterministic = True   # training mode (model.train()) reports the balance loss and metrics

    def router_logits(self, x_BxTxD):
        return jnp.einsum("btd,de->bte", x_BxTxD.astype(jnp.float32), self.router[...].astype(jnp.float32))

    def experts(self):
        return self.w_gate[...], self.w_up[...], self.w_down[...]

    def init_cache(self, batch: int, max_len: int) -> dict:
        """The routing state of patch_selection (what union_routing.choose carries) and the position."""
        del max_len
        E = self.config.num_experts
        return {"route_count": jnp.zeros((batch, E), jnp.int32), "route_take": jnp.zeros((batch, E), bool),
                "end": jnp.zeros((), jnp.int32)}

    def __call__(self, x_BxTxD, *, segment_ids=None, positions=None, cache=None):
        c = self.config
        if cache is not None and segment_ids is not None:
            raise ValueError("segment_ids are not supported while decoding with a cache; decode one sequence per row")
        if c.routing == "expert_selection":
            y_BxTxD = self.expert_selection(x_BxTxD)
            if cache is None:
                return y_BxTxD
            return y_BxTxD, {**cache, "end": cache["end"] + x_BxTxD.shape[1]}
        if cache is not None:
            return self.decode(x_BxTxD, cache)
        shards = seq_size()
        if shards > 1:   # the routing budget runs along the natural order
            x_BxTxD = from_zigzag(x_BxTxD, shards)
            segment_ids = None if segment_ids is None else from_zigzag(segment_ids, shards)
            positions = None if positions is None else from_zigzag(positions, shards)
        y_BxTxD = self.patch_selection(x_BxTxD, segment_ids, positions)
        return to_zigzag(y_BxTxD, shards) if shards > 1 else y_BxTxD

    def expert_selection(self, x_BxTxD):
        """Each token's top_k experts, dropless."""
        c = self.config
        B, T, D = x_BxTxD.shape
        probs_NxE = jax.nn.softmax(self.router_logits(x_BxTxD).reshape(B * T, -1), axis=-1)
        _, experts_NxK = jax.lax.top_k(jax.lax.stop_gradient(probs_NxE), c.top_k)
        gates_NxK = routing.straight_through(jnp.take_along_axis(probs_NxE, experts_NxK, axis=-1))
        x_NxD = x_BxTxD.reshape(B * T, D)
        if expert_parallel.expert_axis_size() > 1:
            y_NxD = expert_parallel.dropless(x_NxD, experts_NxK, gates_NxK, *self.experts(), dtype=c.dtype,
                                             implementation=c.implementation)
        else:
            y_NxD = dropless(x_NxD, experts_NxK, gates_NxK, *self.experts(), dtype=c.dtype,
                             implementation=c.implementation)
        if not self.deterministic:
            ran_BxTxE = jnp.any(jax.nn.one_hot(experts_NxK, c.num_experts, dtype=jnp.bool_), axis=-2).reshape(B, T, -1)
            probs_BxTxE = probs_NxE.reshape(B, T, -1)
            choice = routing.Choice(ran_BxTxE, None, ran_BxTxE, probs_BxTxE, None, None)
            routing.report(self, choice, jnp.ones((B, T), bool), ran_BxTxE, c.balance_loss_weight)
        return y_NxD.reshape(B, T, D).astype(c.dtype)

    def patch_selection(self, x_BxTxD, segment_ids, positions):
        """The whole sequence in natural order: each expert on the tokens in its slots."""
        c = self.config
        B, T, _ = x_BxTxD.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        document, start, index = routing.units(positions, segment_ids, c.unit)
        choice = routing.choose(self.router_logits(x_BxTxD), document, start, index, top_k=c.top_k, rate=c.rate())
        s = routing.slots(choice.take_BxTxE, c.slots(T))
        out_BxExCxD = expert_ffn_slots(routing.gather_rows(x_BxTxD, s.row_BxExC), *self.experts(), c.dtype)
        if not self.deterministic:
            routing.report(self, choice, start, s.kept_BxTxE, c.balance_loss_weight)
        return routing.combine(out_BxExCxD, s, choice.gate_BxTxE).astype(c.dtype)

    def decode(self, x_BxTxD, cache):
        """patch_selection on T new tokens after the cached ones: every expert on every new token,
        combined with the gates of the cached routing state (no buffer: one document per row)."""
        c = self.config
        B, T, _ = x_BxTxD.shape
        position_T = cache["end"] + jnp.arange(T)
        document, start, index = routing.decoding_units(position_T, B, c.unit)
        choice = routing.choose(self.router_logits(x_BxTxD), document, start, index, top_k=c.top_k, rate=c.rate(),
                                count_BxE=cache["route_count"], current_BxE=cache["route_take"])
        every_BxExTxD = jnp.broadcast_to(x_BxTxD[:, None], (B, c.num_experts) + x_BxTxD.shape[1:])
        out_BxExTxD = expert_ffn_slots(every_BxExTxD, *self.experts(), c.dtype)
        y_BxTxD = jnp.einsum("bte,betd->btd", choice.gate_BxTxE, out_BxExTxD).astype(c.dtype)
        return y_BxTxD, {"route_count": choice.count_BxE, "route_take": choice.current_BxE,
                         "end": cache["end"] + T}
