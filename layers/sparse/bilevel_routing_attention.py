"""Bi-level routing attention (Zhu et al., 2023, "BiFormer: Vision Transformer with Bi-Level
Routing Attention"), made causal for language: region = block of `block_size` tokens.

    region level: A[n, m] = sum_h <q_route(n)_h, kbar_{m, g(h)}>   (BiFormer's Q^r K^r^T over all
                  heads, so every head shares the regions); q_route(n) = q at position n * block,
                  kbar_m = mean key of region m; I(n) = top_k complete past regions m < n, plus n
    token level:  o_t = softmax attention of q_t over the keys j <= t of the regions I(t // block)
    LCE:          o_t += causal depthwise conv of width 3 over v (BiFormer's local context
                  enhancement, a 5x5 depthwise conv over v in 2-D; here causal in time, per value
                  channel, added to the head that reads that value head), y = o W_o

BiFormer averages all queries of a region; here the region's first query routes it, because one
key list serves the whole query block and later tokens must not steer earlier ones (see
layers/sparse/block_selection.py). What differs from MoBA (layers/sparse/moba.py, the shared code): routing is
shared across heads, and the LCE term. No routing parameters and no gradient through the choice
(BiFormer's default: no param_routing, no diff_routing).

Parameter budget (d = d_model, W = 3): d D (2 H + 2 Hkv) + (W + 1) Hkv D (conv weights and bias).

Sequence parallelism as MoBA's: local queries, K and V all-gathered over seq in natural order. The
region scores are summed over the heads of every tensor shard (a psum over the mesh axes that split
the heads). The LCE conv runs over the gathered values (all T positions on every device, W Hkv D
per position, small next to the attention) and each device keeps its own rows, so the conv sees
across the seams of the zigzag chunks without a halo exchange.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from hybrax.layers.sparse.moba import MoBA, MoBAConfig
from hybrax.layers.parameters import logical_param, normal
from hybrax.layers.short_conv import short_causal_conv


class BilevelRoutingConfig(MoBAConfig):
    """Parameter budget: d_model * D * (2 H + 2 Hkv) + (lce_width + 1) * Hkv * D."""

    lce_width: int = 3                  # causal depthwise conv over v (local context enhancement); 0 disables

    def num_params(self) -> int:
        lce = (self.lce_width + 1) * self.num_kv_heads * self.head_dim if self.lce_width else 0
        return super().num_params() + lce

    def flops_per_token(self, seq_len: int) -> int:
        """MoBA's count (projections, selected keys, region routing) plus the conv, 2 W Hkv D."""
        return super().flops_per_token(seq_len) + 2 * self.lce_width * self.num_kv_heads * self.head_dim


class BilevelRoutingAttention(MoBA):
    def __init__(self, config: BilevelRoutingConfig, *, rngs: nnx.Rngs):
        super().__init__(config, rngs=rngs)
        c = config
        if c.lce_width:
            self.lce_weight = logical_param(rngs, normal(c.init_std), (c.lce_width, c.num_kv_heads, c.head_dim),
                                            c.param_dtype, ("conv", "kv_heads", "head_dim"))
            self.lce_bias = logical_param(rngs, jax.nn.initializers.zeros, (c.num_kv_heads, c.head_dim),
                                          c.param_dtype, ("kv_heads", "head_dim"))

    def block_scores(self, route_q_BxQxHxD, k_BxSxGxD, head_axes=None):
        """Region affinity summed over heads (one choice for all heads; over the devices of
        `head_axes` too when the heads are split), `[B, H, Q, M]`."""
        scores_BxHxQxM = super().block_scores(route_q_BxQxHxD, k_BxSxGxD)
        total_Bx1xQxM = scores_BxHxQxM.sum(axis=1, keepdims=True)
        if head_axes is not None:
            total_Bx1xQxM = jax.lax.psum(total_Bx1xQxM, head_axes)
        return jnp.broadcast_to(total_Bx1xQxM, scores_BxHxQxM.shape)

    def context_parameters(self) -> dict:
        c = self.config
        if not c.lce_width:
            return {}
        return {"lce_weight": (self.lce_weight[...].astype(c.dtype), ("conv", "kv_heads", "head_dim")),
                "lce_bias": (self.lce_bias[...].astype(c.dtype), ("kv_heads", "head_dim"))}

    def local_context(self, v_BxSxGxD, segment_ids, lce_weight=None, lce_bias=None):
        """The LCE conv over all S values (`[B, S, H, D]`, each value head's channels added to the
        query heads that read it)."""
        if lce_weight is None:
            return None
        lce_BxSxGxD, _ = short_causal_conv(v_BxSxGxD, lce_weight, lce_bias, segment_ids=segment_ids)
        return jnp.repeat(lce_BxSxGxD, self.config.num_heads // self.config.num_kv_heads, axis=2)

