"""NSA-style natively trainable sparse attention (Yuan et al., 2025, "Native Sparse Attention:
Hardware-Aligned and Natively Trainable Sparse Attention"): three branches over shared q, k, v,
mixed per head by learned sigmoid gates.

    q = x W_q, k = x W_k, v = x W_v                        (rotary on q and k, as in Attention)
    (a) compressed: block m of l = `compress_block` tokens (stride l, no overlap, to keep it simple)
        becomes one token kc_m = sum_j w^k_j * k_{m l + j}, vc_m likewise with w^v (w: learned
        per-position, per-channel weights [l, Hkv, D], initialised to the mean 1/l; NSA uses an MLP
        with intra-block positions over the block, this is its linear, depthwise special case).
        Query t attends densely to the compressed tokens of blocks complete at t ((m+1) l - 1 <= t).
    (b) selected: selection blocks of b = `block_size` tokens (l divides b). Query block n is routed
        by its first query (the causality rule, layers/sparse/block_selection.py): its compressed-attention
        probabilities p_cmp over the complete past compressed blocks, summed over the l-blocks inside
        each selection block and over the query heads of each GQA group (NSA shares the choice across
        a group), pick the top_k past blocks; the current block n is added; `block_sparse_attention`.
    (c) sliding window: the current block and the window / b blocks before it, through
        `block_sparse_attention`: query t sees keys from ((t // b) - window / b) b to t, i.e. between
        window + 1 and window + b tokens (block-aligned rather than exactly `window`, so the branch
        stays block-sparse; window a multiple of b).
    o_t = sum_c sigmoid(x_t W_g)[c, h] * o^c_t[h]  for c in (compressed, selected, window);  y = o W_o

NSA gives each branch its own keys and values; here all three share k and v (one set of
projections, the budget of Attention) and differ only by the compression weights.

Shapes: x [B, T, d_model]; q [B, T, H, D]; k, v [B, T, Hkv, D]; compressed [B, ceil(T / l), Hkv, D].
Parameter budget (d = d_model): d D (2 H + 2 Hkv) projections + 2 l Hkv D compression + 3 d H
gates. Decoding keeps the full KV cache and the current block's routing query; compressed tokens
are recomputed from the cache each step (O(S) per step, like the attention itself).

Sequence parallelism (a mesh with seq > 1, no cache; x in zigzag order): the queries and their
gates stay on their device; K and V are all-gathered over seq in natural order
(layers/sparse/gathered_keys.py), and every device compresses all of them (4 Hkv D per
token, small) and computes the three branches for its own queries only. All of K and V travel, not
only the selected blocks. The zigzag chunk (T / (2 seq)) must be a multiple of block_size.
"""

from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx
from pydantic import model_validator

from hybrax.layers.config import ModelShape, itemsize
from hybrax.layers.sparse import block_selection as bs
from hybrax.layers.softmax.skeleton import SoftmaxConfig, SoftmaxMixer
from hybrax.layers.parameters import logical_param, normal
from hybrax.layers.partitioned import block_sparse_attention, dot_product_attention
from hybrax.layers.projection import project
from hybrax.layers.sparse.gathered_keys import attend_with_gathered_keys, offset_implementation


class NSAConfig(SoftmaxConfig):
    """Parameter budget: d_model * D * (2 H + 2 Hkv) + 2 * compress_block * Hkv * D + 3 * d_model * H."""

    kernel: ClassVar[str] = "block_sparse_attention"
    tiny: ClassVar[dict] = {"block_size": 4, "window": 8, "compress_block": 2}

    block_size: int = 16                # selection (and window) block
    top_k: int = 2                      # selected past blocks per query block; the current block is added
    window: int = 32                    # sliding-window tokens before the current block (multiple of block_size)
    compress_block: int | None = None   # tokens per compressed token, divides block_size (None: block_size)

    def derived(self, shape: ModelShape) -> dict:
        return {"compress_block": self.block_size}

    @model_validator(mode="after")
    def _check(self):
        if self.block_size < 1 or self.top_k < 0 or self.window < 0:
            raise ValueError(f"block_size={self.block_size}, top_k={self.top_k}, window={self.window} must be "
                             ">= 1, >= 0, >= 0")
        if self.window % self.block_size:
            raise ValueError(f"window={self.window} must be a multiple of block_size={self.block_size}")
        if self.compress_block is not None and (self.compress_block < 1 or self.block_size % self.compress_block):
            raise ValueError(f"compress_block={self.compress_block} must divide block_size={self.block_size}")
        return self

    def num_params(self) -> int:
        d, H, G, D = self.d_model, self.num_heads, self.num_kv_heads, self.head_dim
        return d * D * (2 * H + 2 * G) + 2 * self.compress_block * G * D + 3 * d * H

    def state_bytes_per_sequence(self) -> int:
        """The routing query of the block being filled (route_q [H, D])."""
        return self.num_heads * self.head_dim * itemsize(self.dtype)

    def flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token: projections and gates 2 (d D (2 H + 2 Hkv) + 3 d H); compression
        4 Hkv D; 4 H D per key read: ceil(T / l) compressed tokens (dense, masked), (top_k + 1)
        selected blocks and window / b + 1 window blocks of b keys (whole blocks, at most the padded
        sequence); routing, one query per block against ceil(T / l) compressed keys, 2 H D ceil(T / l) / b."""
        d, H, G, D, b = self.d_model, self.num_heads, self.num_kv_heads, self.head_dim, self.block_size
        n_blocks, n_compressed = bs.num_blocks(seq_len, b), bs.num_blocks(seq_len, self.compress_block)
        keys = n_compressed + (min(self.top_k + 1, n_blocks) + min(self.window // b + 1, n_blocks)) * b
        projections = 2 * (d * D * (2 * H + 2 * G) + 3 * d * H)
        return projections + 4 * G * D + 4 * H * D * keys + 2 * H * D * n_compressed // b


def compress(x_BxTxGxD: jnp.ndarray, weight_LxGxD: jnp.ndarray) -> jnp.ndarray:
    """One token per block of l: `sum_j weight[j] * x[m l + j]`, `[B, ceil(T / l), G, D]` (zero-padded)."""
    B, T, G, D = x_BxTxGxD.shape
    L = weight_LxGxD.shape[0]
    M = bs.num_blocks(T, L)
    x = jnp.pad(x_BxTxGxD, ((0, 0), (0, M * L - T), (0, 0), (0, 0))).reshape(B, M, L, G, D)
    return jnp.einsum("bmlgd,lgd->bmgd", x, weight_LxGxD.astype(x.dtype), preferred_element_type=jnp.float32
                      ).astype(x_BxTxGxD.dtype)


def compressed_visible(query_positions_Q, num_compressed: int, compress_block: int, segment_ids=None):
    """bool `[B or 1, Q, M]`: compressed block m is complete at the query position (and, with
    segment_ids, lies wholly in the query's segment)."""
    m_M = jnp.arange(num_compressed)
    visible = ((m_M + 1) * compress_block - 1 <= query_positions_Q[:, None])[None]
    if segment_ids is not None:
        T = segment_ids.shape[1]
        first_M, last_M = jnp.minimum(m_M * compress_block, T - 1), jnp.minimum((m_M + 1) * compress_block, T) - 1
        seg_BxQ = segment_ids[:, query_positions_Q]
        visible = visible & (segment_ids[:, None, first_M] == seg_BxQ[:, :, None]) & (
            segment_ids[:, None, last_M] == seg_BxQ[:, :, None])
    return visible


class NSA(SoftmaxMixer):
    def __init__(self, config: NSAConfig, *, rngs: nnx.Rngs):
        super().__init__(config, rngs=rngs)
        c = config
        mean = lambda key, shape, dtype: jnp.full(shape, 1.0 / c.compress_block, dtype)  # noqa: E731
        compress_shape = (c.compress_block, c.num_kv_heads, c.head_dim)
        self.compress_k = logical_param(rngs, mean, compress_shape, c.param_dtype, ("conv", "kv_heads", "head_dim"))
        self.compress_v = logical_param(rngs, mean, compress_shape, c.param_dtype, ("conv", "kv_heads", "head_dim"))
        self.w_gate = logical_param(rngs, normal(c.init_std), (c.d_model, 3, c.num_heads), c.param_dtype, ("embed", None, "heads"))

    def _selection_scores(self, route_q_BxQxHxD, kc_BxMxGxD, visible, num_blocks):
        """NSA's importance scores `[B, Hkv, Q, num_blocks]`: the routing query's compressed-attention
        probabilities, summed over the compressed blocks of each selection block and over the heads
        of each GQA group. No gradient flows through the choice."""
        c = self.config
        B, Q, H, D = route_q_BxQxHxD.shape
        M, G = kc_BxMxGxD.shape[1:3]
        logits_BxHxQxM = bs.grouped_scores(jax.lax.stop_gradient(route_q_BxQxHxD),
                                           jax.lax.stop_gradient(kc_BxMxGxD)) * D ** -0.5
        visible_Bx1xQxM = visible[:, None]
        probs = jax.nn.softmax(jnp.where(visible_Bx1xQxM, logits_BxHxQxM, -jnp.inf), axis=-1)
        probs = jnp.where(visible_Bx1xQxM, probs, 0.0)  # rows with nothing visible: zeros, not NaN
        probs_BxGxQxM = probs.reshape(B, G, H // G, Q, M).sum(axis=2)
        per_block = c.block_size // c.compress_block
        probs_BxGxQxM = jnp.pad(probs_BxGxQxM, ((0, 0), (0, 0), (0, 0), (0, num_blocks * per_block - M)))
        return probs_BxGxQxM.reshape(B, G, Q, num_blocks, per_block).sum(axis=-1)

    # ---- the skeleton's paths (layers/softmax/skeleton.py) -----------------------------------

    def token_inputs(self, x_BxTxD, q_BxTxHxD, k_BxTxGxD) -> dict:
        return {"gates_BxTx3xH": jax.nn.sigmoid(project("btd,dch->btch", x_BxTxD, self.w_gate, "float32"))}

    def attend(self, q_BxTxHxD, k_BxTxGxD, v_BxTxGxD, segment_ids, *, gates_BxTx3xH):
        return self._attend_blocks(q_BxTxHxD, k_BxTxGxD, v_BxTxGxD, segment_ids, segment_ids,
                                   gates_BxTx3xH=gates_BxTx3xH, **self._compression())

    def attend_sequence_parallel(self, q_BxTxHxD, k_BxTxGxD, v_BxTxGxD, segment_ids, *, gates_BxTx3xH):
        extras = {"gates_BxTx3xH": (gates_BxTx3xH, ("batch", "length", None, "heads")),
                  **{name: (w, ("conv", "kv_heads", "head_dim")) for name, w in self._compression().items()}}
        return attend_with_gathered_keys(self._attend_blocks, q_BxTxHxD, k_BxTxGxD, v_BxTxGxD, segment_ids,
                                         block=self.config.block_size, extras=extras)

    def cache_state(self, batch: int, max_len: int) -> dict:
        """route_q: the routing query of the block that holds the last cached position."""
        c = self.config
        return {"route_q": jnp.zeros((batch, c.num_heads, c.head_dim), c.dtype)}

    def attend_cached(self, q_BxTxHxD, k_BxSxGxD, v_BxSxGxD, position_T, cache, *, gates_BxTx3xH):
        b = self.config.block_size
        route_q_BxQxHxD, route_q = bs.cached_routing_queries(q_BxTxHxD, cache["route_q"], cache["end"], b)
        sparse = lambda indices: bs.attend_with_mask(  # noqa: E731
            q_BxTxHxD, k_BxSxGxD, v_BxSxGxD, bs.selection_mask(indices, position_T, k_BxSxGxD.shape[1], b))
        # one routing row per token: the routing positions are the query positions
        o_BxTxHxD = self._branches(q_BxTxHxD, k_BxSxGxD, v_BxSxGxD, gates_BxTx3xH, route_q_BxQxHxD, position_T,
                                   position_T, None, sparse, **self._compression())
        return o_BxTxHxD, {"route_q": route_q.astype(cache["route_q"].dtype)}

    def _compression(self) -> dict:
        return {"compress_k": self.compress_k[...], "compress_v": self.compress_v[...]}

    def _attend_blocks(self, q_BxTxHxD, k_BxSxGxD, v_BxSxGxD, q_segment_ids, kv_segment_ids, query_block_Q=None,
                       head_axes=None, *, gates_BxTx3xH, compress_k, compress_v):
        """The parallel form for the query blocks `query_block_Q` (natural block index of each block
        of q; None: q holds every position, T == S) against all S keys. Segment ids: the queries'
        [B, T] and the keys' [B, S]."""
        c = self.config
        b = c.block_size
        offset = query_block_Q
        query_block_Q = jnp.arange(bs.num_blocks(q_BxTxHxD.shape[1], b)) if offset is None else offset
        position_T = (query_block_Q[:, None] * b + jnp.arange(b)).reshape(-1)[:q_BxTxHxD.shape[1]]
        sparse = lambda indices: block_sparse_attention(  # noqa: E731
            q_BxTxHxD, k_BxSxGxD, v_BxSxGxD, indices, block_size=(b, b), segment_ids=q_segment_ids,
            kv_segment_ids=None if offset is None else kv_segment_ids, query_blocks=offset,
            implementation=c.implementation if offset is None else offset_implementation(c.implementation))
        return self._branches(q_BxTxHxD, k_BxSxGxD, v_BxSxGxD, gates_BxTx3xH, bs.routing_queries(q_BxTxHxD, b),
                              position_T, query_block_Q * b, kv_segment_ids, sparse, compress_k, compress_v)

    def _branches(self, q_BxTxHxD, k_BxSxGxD, v_BxSxGxD, gates_BxTx3xH, route_q_BxQxHxD, position_T, position_Q,
                  kv_segment_ids, sparse, compress_k, compress_v):
        """The three branches mixed by the gates, `[B, T, H, D]`: queries at positions position_T,
        routed by route_q (one row per query block, or per token when decoding) at position_Q;
        `sparse(block_indices)` attends to the listed blocks."""
        c = self.config
        b, l = c.block_size, c.compress_block
        B, _, H, _ = q_BxTxHxD.shape
        S, G = k_BxSxGxD.shape[1:3]
        num_blocks, query_block_Q = bs.num_blocks(S, b), position_Q // b

        # (a) compressed tokens, dense attention over the complete ones
        kc_BxMxGxD, vc_BxMxGxD = compress(k_BxSxGxD, compress_k), compress(v_BxSxGxD, compress_v)
        M = kc_BxMxGxD.shape[1]
        cmp_visible = compressed_visible(position_T, M, l, kv_segment_ids)
        o_cmp = dot_product_attention(q_BxTxHxD, kc_BxMxGxD, vc_BxMxGxD, causal=False, mask=cmp_visible)

        # (b) selected blocks, chosen per GQA group by the routing query's compressed attention
        route_visible = compressed_visible(query_block_Q * b, M, l, kv_segment_ids)
        scores_BxGxQxN = self._selection_scores(route_q_BxQxHxD, kc_BxMxGxD, route_visible, num_blocks)
        valid = None if kv_segment_ids is None else bs.same_segment_candidates(kv_segment_ids, position_Q, b)
        selected_BxHxQxK = jnp.repeat(bs.causal_top_k_blocks(scores_BxGxQxN, query_block_Q, c.top_k, valid),
                                      H // G, axis=1)
        # (c) the window's blocks
        window_QxK = bs.local_blocks(query_block_Q, c.window // b)
        window_BxHxQxK = jnp.broadcast_to(window_QxK, (B, H, *window_QxK.shape))
        o_sel, o_win = sparse(selected_BxHxQxK), sparse(window_BxHxQxK)

        g = gates_BxTx3xH[..., None]
        return (g[:, :, 0] * o_cmp + g[:, :, 1] * o_sel + g[:, :, 2] * o_win).astype(c.dtype)
