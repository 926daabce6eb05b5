"""MoBA: Mixture of Block Attention (Lu et al., 2025, "MoBA: Mixture of Block Attention for
Long-Context LLMs"), with grouped-query heads and rotary positions, made causal per block.

    q = x W_q, k = x W_k, v = x W_v                     (rotary on q and k, as in Attention)
    kbar_m = mean of the keys of block m                 (block = `block_size` tokens)
    gate[h, n, m] = <q_route(n), kbar_m>                 per head; q_route(n) = q at position n * block
    I(n) = top_k over complete past blocks m < n of gate[h, n, m], plus the current block n
    o_t = softmax over keys j in the blocks I(t // block), j <= t, of q_t . k_j / sqrt(D) ; y = o W_o

MoBA's paper gates each query token by itself; here the whole query block shares the choice of
its first token, because `block_sparse_attention` takes one list per query block and a choice by
later tokens would leak them into earlier ones (layers/sparse/block_selection.py states the rule). The
gate has no parameters and no gradient (as in MoBA); gradients reach q, k, v through the attention.

Shapes: x [B, T, d_model]; q [B, T, H, D]; k, v [B, T, Hkv, D]. Parameter budget (d = d_model):
d D (2 H + 2 Hkv), the same as Attention. Decoding keeps the full KV cache plus the routing query
of the current block; a step attends densely with a mask built from the same selection, so
token-by-token outputs equal the parallel ones.

Sequence parallelism (a mesh with seq > 1, no cache; x in zigzag order): the queries stay on
their device and the keys and values are all-gathered over seq, in natural order
(layers/sparse/gathered_keys.py); each device selects and attends for its own query
blocks only. The gate's block means are taken from the gathered keys (they are needed whole for
the attention anyway), and all of K and V travel, not only the selected blocks. The zigzag chunk
(T / (2 seq)) must be a multiple of block_size.

`MoBA` is also the base of `BilevelRoutingAttention`, which overrides `block_scores`,
`context_parameters` and `local_context`.
"""

from typing import ClassVar

import jax
import jax.numpy as jnp
from pydantic import model_validator

from hybrax.layers.sparse import block_selection as bs
from hybrax.layers.config import itemsize
from hybrax.layers.softmax.skeleton import SoftmaxConfig, SoftmaxMixer
from hybrax.layers.partitioned import block_sparse_attention
from hybrax.layers.sparse.gathered_keys import attend_with_gathered_keys, offset_implementation


class MoBAConfig(SoftmaxConfig):
    """Parameter budget: d_model * D * (2 H + 2 Hkv)."""

    kernel: ClassVar[str] = "block_sparse_attention"
    tiny: ClassVar[dict] = {"block_size": 4}

    block_size: int = 16                # tokens per query block and per key block
    top_k: int = 2                      # past blocks per query block; the current block is always added

    @model_validator(mode="after")
    def _check(self):
        if self.block_size < 1:
            raise ValueError(f"block_size={self.block_size} must be >= 1")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0")
        return self

    def selected_keys(self, seq_len: int) -> int:
        """Keys scored per query: (top_k + 1) whole blocks (the op computes whole blocks and masks the
        future part of the current one), at most the padded sequence."""
        n_blocks = bs.num_blocks(seq_len, self.block_size)
        return min(self.top_k + 1, n_blocks) * self.block_size

    def state_bytes_per_sequence(self) -> int:
        """The routing query of the block being filled (route_q [H, D])."""
        return self.num_heads * self.head_dim * itemsize(self.dtype)

    def flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token: projections 2 * projection_params; q.k and weights.v over the selected
        keys only, 4 H D per key; the gate, one routing query per block against ceil(T / block) mean
        keys, 2 H D ceil(T / block) / block per token."""
        H, D, b = self.num_heads, self.head_dim, self.block_size
        gate = 2 * H * D * bs.num_blocks(seq_len, b) // b
        return 2 * self.projection_params() + 4 * H * D * self.selected_keys(seq_len) + gate


class MoBA(SoftmaxMixer):
    # ---- what the subclasses change ----------------------------------------------------------

    def block_scores(self, route_q_BxQxHxD, k_BxSxGxD, head_axes=None):
        """MoBA's gate: each head's routing query against its key head's mean key per block,
        float32 `[B, H, Q, ceil(S / block)]`. head_axes: the mesh axes the heads are split over
        (inside shard_map), for a score shared across heads."""
        return bs.grouped_scores(route_q_BxQxHxD, bs.block_mean(k_BxSxGxD, self.config.block_size))

    def context_parameters(self) -> dict:
        """The parameters of `local_context`: name -> (array in the compute dtype, logical axes)."""
        return {}

    def local_context(self, v_BxSxGxD, segment_ids, **parameters):
        """A term added to the attention output per key position (`[B, S, H, D]`), or None."""
        return None

    # ---- the skeleton's paths (layers/softmax/skeleton.py) -----------------------------------

    def attend(self, q_BxTxHxD, k_BxTxGxD, v_BxTxGxD, segment_ids):
        return self._attend_blocks(q_BxTxHxD, k_BxTxGxD, v_BxTxGxD, segment_ids, segment_ids, **self._context())

    def attend_sequence_parallel(self, q_BxTxHxD, k_BxTxGxD, v_BxTxGxD, segment_ids):
        return attend_with_gathered_keys(self._attend_blocks, q_BxTxHxD, k_BxTxGxD, v_BxTxGxD, segment_ids,
                                         block=self.config.block_size, extras=self.context_parameters())

    def cache_state(self, batch: int, max_len: int) -> dict:
        """route_q: the routing query of the block that holds the last cached position."""
        c = self.config
        return {"route_q": jnp.zeros((batch, c.num_heads, c.head_dim), c.dtype)}

    def attend_cached(self, q_BxTxHxD, k_BxSxGxD, v_BxSxGxD, position_T, cache):
        c = self.config
        b, end, T = c.block_size, cache["end"], q_BxTxHxD.shape[1]
        route_q_BxTxHxD, route_q = bs.cached_routing_queries(q_BxTxHxD, cache["route_q"], end, b)
        scores_BxHxTxM = self.block_scores(route_q_BxTxHxD, k_BxSxGxD)
        indices_BxHxTxK = bs.causal_top_k_blocks(scores_BxHxTxM, position_T // b, c.top_k)
        visible_BxHxTxS = bs.selection_mask(indices_BxHxTxK, position_T, k_BxSxGxD.shape[1], b)
        o_BxTxHxD = bs.attend_with_mask(q_BxTxHxD, k_BxSxGxD, v_BxSxGxD, visible_BxHxTxS)
        local = self.local_context(v_BxSxGxD, None, **self._context())
        if local is not None:
            local_BxTxHxD = jax.lax.dynamic_slice_in_dim(local, end, T, axis=1)
            o_BxTxHxD = o_BxTxHxD + local_BxTxHxD.astype(o_BxTxHxD.dtype)
        return o_BxTxHxD, {"route_q": route_q.astype(cache["route_q"].dtype)}

    def _context(self) -> dict:
        return {name: array for name, (array, _) in self.context_parameters().items()}

    def _attend_blocks(self, q_BxTxHxD, k_BxSxGxD, v_BxSxGxD, q_segment_ids, kv_segment_ids, query_block_Q=None,
                       head_axes=None, **context):
        """The parallel form for the query blocks `query_block_Q` (natural block index of each block
        of q; None: q holds every position, T == S) against all S keys: select, attend, add the
        local context of the query rows. Segment ids: the queries' [B, T] and the keys' [B, S]."""
        c = self.config
        b = c.block_size
        offset = query_block_Q
        query_block_Q = jnp.arange(bs.num_blocks(q_BxTxHxD.shape[1], b)) if offset is None else offset
        scores_BxHxQxN = self.block_scores(bs.routing_queries(q_BxTxHxD, b), k_BxSxGxD, head_axes)
        valid = None if kv_segment_ids is None else bs.same_segment_candidates(kv_segment_ids, query_block_Q * b, b)
        indices_BxHxQxK = bs.causal_top_k_blocks(scores_BxHxQxN, query_block_Q, c.top_k, valid)
        o_BxTxHxD = block_sparse_attention(
            q_BxTxHxD, k_BxSxGxD, v_BxSxGxD, indices_BxHxQxK, block_size=(b, b), segment_ids=q_segment_ids,
            kv_segment_ids=None if offset is None else kv_segment_ids, query_blocks=offset,
            implementation=c.implementation if offset is None else offset_implementation(c.implementation))
        local_BxSxHxD = self.local_context(v_BxSxGxD, kv_segment_ids, **context)
        if local_BxSxHxD is None:
            return o_BxTxHxD
        if offset is not None:
            local_BxSxHxD = jnp.take(local_BxSxHxD, (offset[:, None] * b + jnp.arange(b)).reshape(-1), axis=1)
        return o_BxTxHxD + local_BxSxHxD.astype(o_BxTxHxD.dtype)
