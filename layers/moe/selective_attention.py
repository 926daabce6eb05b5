"""Selective Multi-Head Attention (SMHA), the attention half of Union of Experts (Yang et al., 2025):
the heads are the experts. Softmax attention's output projection splits by head,

    y_t = sum_h o_{t,h} W_o[h],   o_{t,h} = softmax(q_{t,h} K_h^T / sqrt(D) + causal mask) V_h,

so expert e (a group of H / E query heads, one head each by default) owns W_q[:, e] and W_o[e] and
the sum over all experts is the dense attention. A token runs on the experts that took it
(layers/moe/union_routing.py: its top_k heads in expert_selection, its patch's in patch_selection,
each expert under a causal running budget) with the straight-through gate g (value 1):

    y_t = sum_{e took t} g_{t,e} sum_{h in e} o_{t,h} W_o[h]

Keys and values stay dense (every head's k, v of every token: any later query may take any head),
so the KV cache is attention's. Expert e computes queries, scores and output projection only for
the C tokens in its slots (C = ceil(rho N) P, union_routing.slots): its queries are gathered,
projected with W_q[:, e], rotated at their positions, and attend to the whole row (keys <= the
query's row, same segment) through `dot_product_attention` with an explicit mask, the experts on the
batch axis. With every expert taking every token the layer is `attention` with the same weights.

Shapes: x [B, T, d_model]; slots [B, E, C, H / E, D]; k, v [B, T, Hkv, D]. Parameters: attention's
d_model D (2 H + 2 Hkv) plus the router d_model E.

Decoding runs the softmax skeleton's cached path (layers/softmax/skeleton.py): the new tokens'
choices come from the cache's routing state (count per expert, the current patch's choice), every
head attends to the cache, and the heads of experts that did not take the token are zeroed.

Sequence parallelism (seq > 1): the routing budget runs along the whole sequence, so the layer
puts the rows in natural order (an all-gather of the sequence, done by XLA), computes as on one
device and returns the zigzag order; the attention itself is split over rows and heads as usual.
An exchange of per-device routing summaries (the min-plus maps compose) would avoid the gather.
"""

from typing import ClassVar

import jax.numpy as jnp
import numpy as np
from flax import nnx
from pydantic import model_validator

from hybrax.layers.config import ModelShape
from hybrax.layers.embeddings import apply_rotary
from hybrax.layers.moe import union_routing as routing
from hybrax.layers.parameters import logical_param, normal
from hybrax.layers.partitioned import dot_product_attention
from hybrax.layers.projection import project
from hybrax.layers.sequence_parallel.layout import from_zigzag, seq_size, to_zigzag
from hybrax.layers.softmax.skeleton import SoftmaxConfig, SoftmaxMixer


class SelectiveAttentionConfig(SoftmaxConfig, routing.UnionRoutingConfig):
    """Parameter budget: d_model D (2 H + 2 Hkv) + d_model E. Active per token: the router, k and v,
    and the q and output projections of top_k experts."""

    kernel: ClassVar[str] = "attention"
    tiny: ClassVar[dict] = {"top_k": 2, "capacity_factor": 1.0, "patch_size": 4}

    num_experts: int | None = None      # E, each a group of num_heads / E query heads (None: num_heads, a head each)

    def derived(self, shape: ModelShape) -> dict:
        return {"num_experts": self.num_heads if "num_heads" in self.model_fields_set else shape.num_heads}

    @model_validator(mode="after")
    def _check_experts(self):
        if self.num_experts is not None and self.num_heads % self.num_experts:
            raise ValueError(f"num_experts={self.num_experts} does not divide num_heads={self.num_heads}")
        return self

    @property
    def heads_per_expert(self) -> int:
        return self.num_heads // self.num_experts

    def num_params(self) -> int:
        return self.projection_params() + self.d_model * self.num_experts

    def num_active_params(self) -> int:
        D, Dh = self.d_model, self.head_dim
        return D * self.num_experts + 2 * D * Dh * self.num_kv_heads + 2 * D * Dh * self.heads_per_expert * self.top_k

    def flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token: the router, k and v for every token, and per filled-or-empty slot
        (E C of them per row, union_routing.slots) the query and output projections of its expert
        and its scores against all `seq_len` keys (dense kernel, masked afterwards). The gathers and
        the combine (2 E d_model) are not counted."""
        D, Dh, He, E = self.d_model, self.head_dim, self.heads_per_expert, self.num_experts
        C = self.slots(seq_len)
        per_slot = 2 * 2 * D * He * Dh + 4 * seq_len * He * Dh
        return 2 * D * E + 2 * 2 * D * Dh * self.num_kv_heads + E * C * per_slot // seq_len


class SelectiveAttention(SoftmaxMixer):
    def __init__(self, config: SelectiveAttentionConfig, *, rngs: nnx.Rngs):
        super().__init__(config, rngs=rngs)
        c = config
        self.router = logical_param(rngs, normal(c.init_std), (c.d_model, c.num_experts), c.param_dtype,
                                    ("embed", None))
        self.deterministic = True   # training mode (model.train()) reports the balance loss and metrics

    def router_logits(self, x_BxTxD):
        return jnp.einsum("btd,de->bte", x_BxTxD.astype(jnp.float32), self.router[...].astype(jnp.float32))

    def kv_heads(self) -> np.ndarray:
        """int [E, Ge]: the key/value heads that expert e's query heads read (grouped-query)."""
        c = self.config
        E, He, group = c.num_experts, c.heads_per_expert, c.num_heads // c.num_kv_heads
        if He % group == 0:      # whole groups per expert
            return np.arange(E * He // group).reshape(E, He // group)
        if group % He == 0:      # several experts per key/value head
            return (np.arange(E) * He // group)[:, None]
        return (np.arange(c.num_heads) // group).reshape(E, He)   # each query head its own copy

    def __call__(self, x_BxTxD, *, segment_ids=None, positions=None, cache=None):
        if cache is not None:   # decoding: the skeleton's cached path with `attend_cached` below
            return super().__call__(x_BxTxD, segment_ids=segment_ids, positions=positions, cache=cache)
        shards = seq_size()
        if shards > 1:          # routing runs along the natural order (module docstring)
            x_BxTxD = from_zigzag(x_BxTxD, shards)
            segment_ids = None if segment_ids is None else from_zigzag(segment_ids, shards)
            positions = None if positions is None else from_zigzag(positions, shards)
        y_BxTxD = self.parallel(x_BxTxD, segment_ids, positions)
        return to_zigzag(y_BxTxD, shards) if shards > 1 else y_BxTxD

    def parallel(self, x_BxTxD, segment_ids, positions):
        """The whole sequence in natural order: [B, T, d_model]."""
        c = self.config
        B, T, D = x_BxTxD.shape
        E, He, Dh = c.num_experts, c.heads_per_expert, c.head_dim
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        document, start, index = routing.units(positions, segment_ids, c.unit)
        choice = routing.choose(self.router_logits(x_BxTxD), document, start, index, top_k=c.top_k, rate=c.rate())
        s = routing.slots(choice.take_BxTxE, c.slots(T))
        C = s.row_BxExC.shape[-1]
        # keys and values of every token, each expert's view of them on the batch axis
        k_BxTxGxK = apply_rotary(project("btd,dgk->btgk", x_BxTxD, self.w_k, c.dtype), positions, c.rope_theta)
        v_BxTxGxK = project("btd,dgk->btgk", x_BxTxD, self.w_v, c.dtype)
        per_expert = lambda a: jnp.moveaxis(jnp.take(a, self.kv_heads(), axis=2), 2, 1).reshape(  # noqa: E731
            B * E, T, -1, Dh)
        # queries of the slots only
        xs_BxExCxD = routing.gather_rows(x_BxTxD, s.row_BxExC)
        q_BxExCxHxK = project("becd,dehk->bechk", xs_BxExCxD, self.w_q[...].reshape(D, E, He, Dh), c.dtype)
        slot_positions = routing.gather_rows(positions, s.row_BxExC).reshape(B, E * C)
        q = apply_rotary(q_BxExCxHxK.reshape(B, E * C, He, Dh), slot_positions, c.rope_theta).reshape(B * E, C, He, Dh)
        seen_BxExCxT = jnp.arange(T) <= s.row_BxExC[..., None]          # causal in row order
        if segment_ids is not None:
            seen_BxExCxT &= routing.gather_rows(segment_ids, s.row_BxExC)[..., None] == segment_ids[:, None, None, :]
        o = dot_product_attention(q, per_expert(k_BxTxGxK), per_expert(v_BxTxGxK), causal=False,
                                  mask=seen_BxExCxT.reshape(B * E, C, T), implementation=c.implementation)
        out_BxExCxD = project("bechk,ehkd->becd", o.reshape(B, E, C, He, Dh), self.w_o[...].reshape(E, He, Dh, D),
                              c.dtype)
        if not self.deterministic:
            routing.report(self, choice, start, s.kept_BxTxE, c.balance_loss_weight)
        return routing.combine(out_BxExCxD, s, choice.gate_BxTxE).astype(c.dtype)

    # ---- decoding: the skeleton's cached path --------------------------------------------------------

    def token_inputs(self, x_BxTxD, q_BxTxHxD, k_BxTxGxD) -> dict:
        return {"router_logits_BxTxE": self.router_logits(x_BxTxD)}

    def cache_state(self, batch: int, max_len: int) -> dict:
        """route_count: units each expert took in the document; route_take: the current unit's choice."""
        E = self.config.num_experts
        return {"route_count": jnp.zeros((batch, E), jnp.int32), "route_take": jnp.zeros((batch, E), bool)}

    def attend_cached(self, q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, position_T, cache, *, router_logits_BxTxE):
        c = self.config
        B = q_BxTxHxK.shape[0]
        document, start, index = routing.decoding_units(position_T, B, c.unit)
        choice = routing.choose(router_logits_BxTxE, document, start, index, top_k=c.top_k, rate=c.rate(),
                                count_BxE=cache["route_count"], current_BxE=cache["route_take"])
        visible_TxS = jnp.arange(k_BxSxGxK.shape[1])[None, :] <= position_T[:, None]
        o_BxTxHxK = dot_product_attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, causal=False, mask=visible_TxS,
                                          implementation=c.implementation)
        gate_BxTxH = jnp.repeat(choice.gate_BxTxE, c.heads_per_expert, axis=-1)
        o_BxTxHxK = (o_BxTxHxK * gate_BxTxH[..., None]).astype(o_BxTxHxK.dtype)
        return o_BxTxHxK, {"route_count": choice.count_BxE, "route_take": choice.current_BxE}

    def attend(self, *args, **kwargs):
        raise NotImplementedError("SelectiveAttention computes its no-cache path in `parallel`")

    attend_sequence_parallel = attend
