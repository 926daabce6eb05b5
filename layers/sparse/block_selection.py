"""Causal block selection for the block-sparse mixers (moba, nsa, bilevel_routing_attention, and
routing_attention): which key blocks each query block reads through `block_sparse_attention`.

Blocks have `block` tokens for queries and keys alike; block n holds row positions
[n * block, (n + 1) * block), counted from the start of the row (not of the packed document).

The causality rule. `block_sparse_attention` takes one list per query block, so the list used by
every token of query block n may depend only on tokens at or before the block's FIRST position
n * block; otherwise later tokens of the block would leak into earlier ones through the discrete
choice (invisible to gradients, visible to decoding and to perturbations). So:

    routing query of block n  = q at position n * block                        (routing_queries)
    candidates of block n     = complete past key blocks m < n                 (causal_top_k_blocks)
    score[b, h, n, m]         = any per-(query block, key block) score, e.g. the routing query
                                against the block's mean key (grouped_scores, block_mean)
    block_indices[b, h, n]    = top_k candidates by score (-1 for empty slots), then n itself
                                (its keys are causally masked inside the op)

With `segment_ids`, candidates whose last token lies in another segment than the routing position
are dropped (`same_segment_candidates`): the op masks across segments anyway; this only stops slots
being wasted.

The routing rows may be any subset of the query blocks, named by their block index (`query_block_Q`,
routing positions `query_block_Q * block`) against all key blocks: under sequence parallelism each
device routes only its own query blocks, with keys (or key-block summaries) gathered in natural
order.

Decoding (`cached_routing_queries`, `selection_mask`, `attend_with_mask`) applies the same rule per
token: the token at position p belongs to block p // block, whose routing query is cached when its
first token is processed; a dense attention masked to the selected blocks (and to keys <= p) gives
the numbers of the parallel form.
"""

import jax
import jax.numpy as jnp

from hybrax.pallas_kernels.dot_product_attention import dot_product_attention


def num_blocks(length: int, block: int) -> int:
    return -(-length // block)


def block_mean(x_BxTxGxD: jnp.ndarray, block: int) -> jnp.ndarray:
    """Mean over the tokens of each block, float32 `[B, ceil(T / block), G, D]` (a partial last block
    averages the tokens it has)."""
    B, T = x_BxTxGxD.shape[:2]
    N = num_blocks(T, block)
    x = jnp.pad(x_BxTxGxD.astype(jnp.float32), ((0, 0), (0, N * block - T), (0, 0), (0, 0)))
    count_N = jnp.minimum(block, T - jnp.arange(N) * block).astype(jnp.float32)
    return x.reshape(B, N, block, *x.shape[2:]).sum(axis=2) / count_N[:, None, None]


def routing_queries(q_BxTxHxD: jnp.ndarray, block: int) -> jnp.ndarray:
    """`[B, ceil(T / block), H, D]`: the query at the first position of each block."""
    return q_BxTxHxD[:, ::block]


def grouped_scores(q_BxQxHxD: jnp.ndarray, keys_BxMxGxD: jnp.ndarray) -> jnp.ndarray:
    """float32 `[B, H, Q, M]` dot products of each query head with its key/value head's keys (query
    head h reads key head h // (H // G), as in grouped-query attention)."""
    B, Q, H, D = q_BxQxHxD.shape
    G = keys_BxMxGxD.shape[2]
    q_BxQxGxRxD = q_BxQxHxD.astype(jnp.float32).reshape(B, Q, G, H // G, D)
    scores = jnp.einsum("bqgrd,bmgd->bgrqm", q_BxQxGxRxD, keys_BxMxGxD.astype(jnp.float32))
    return scores.reshape(B, H, Q, keys_BxMxGxD.shape[1])


def same_segment_candidates(segment_ids_BxT: jnp.ndarray, query_positions_Q: jnp.ndarray,
                            block: int) -> jnp.ndarray:
    """bool `[B, Q, N]`: key block m's last token is in the segment of the routing position."""
    T = segment_ids_BxT.shape[1]
    last_N = jnp.minimum((jnp.arange(num_blocks(T, block)) + 1) * block, T) - 1
    return segment_ids_BxT[:, query_positions_Q, None] == segment_ids_BxT[:, None, last_N]


def causal_top_k_blocks(scores_BxHxQxM: jnp.ndarray, query_block_Q: jnp.ndarray, top_k: int,
                        valid: jnp.ndarray | None = None) -> jnp.ndarray:
    """int32 `[B, H, Q, top_k + 1]` block lists: for each routing query q (of query block
    `query_block_Q[q]` = n), the top_k key blocks m < n by score (restricted to `valid` when given,
    `[B, Q, M]` or per head `[B, H, Q, M]`; -1 where fewer candidates exist), then n itself. The
    parallel form passes Q = N routing queries with query_block = arange(N); a sequence-parallel
    device its own query blocks (natural indices, layers/sparse/gathered_keys.py);
    decoding one row per token."""
    B, H, Q, M = scores_BxHxQxM.shape
    candidate_QxM = jnp.arange(M)[None, :] < query_block_Q[:, None]
    candidate_BxHxQxM = jnp.broadcast_to(candidate_QxM, (B, H, Q, M))
    if valid is not None:
        candidate_BxHxQxM = candidate_BxHxQxM & (valid if valid.ndim == 4 else valid[:, None])
    current_BxHxQx1 = jnp.broadcast_to(query_block_Q.astype(jnp.int32)[:, None], (B, H, Q, 1))
    k = min(top_k, M)
    if k == 0:
        return jnp.concatenate([jnp.full((B, H, Q, top_k), -1, jnp.int32), current_BxHxQx1], axis=-1)
    masked = jnp.where(candidate_BxHxQxM, scores_BxHxQxM.astype(jnp.float32), -jnp.inf)
    _, index_BxHxQxK = jax.lax.top_k(jax.lax.stop_gradient(masked), k)
    picked = jnp.take_along_axis(candidate_BxHxQxM, index_BxHxQxK, axis=-1)
    index_BxHxQxK = jnp.where(picked, index_BxHxQxK, -1).astype(jnp.int32)
    empty = jnp.full((B, H, Q, top_k - k), -1, jnp.int32)
    return jnp.concatenate([index_BxHxQxK, empty, current_BxHxQx1], axis=-1)


def local_blocks(query_block_Q: jnp.ndarray, num_past: int) -> jnp.ndarray:
    """int32 `[Q, num_past + 1]`: blocks n - num_past, ..., n for each n in query_block_Q (-1 before
    the first block): a block-aligned sliding window."""
    index_QxK = query_block_Q[:, None] + jnp.arange(-num_past, 1)[None, :]
    return jnp.where(index_QxK >= 0, index_QxK, -1).astype(jnp.int32)


# ---- the cached (decoding) form ---------------------------------------------------------------

def cached_routing_queries(q_BxTxHxD: jnp.ndarray, route_q_BxHxD: jnp.ndarray, end, block: int):
    """Routing query of each of T new tokens at positions end, ..., end + T - 1: the new token at its
    block's start if that start is among them, else the cached `route_q` (the routing query of the
    block holding position end - 1). Returns (`[B, T, H, D]`, the new cached routing query)."""
    T = q_BxTxHxD.shape[1]
    start_T = (end + jnp.arange(T)) // block * block
    index_T = start_T - end
    gathered = q_BxTxHxD[:, jnp.clip(index_T, 0, T - 1)]
    route_BxTxHxD = jnp.where((index_T >= 0)[None, :, None, None], gathered,
                              route_q_BxHxD.astype(q_BxTxHxD.dtype)[:, None])
    return route_BxTxHxD, route_BxTxHxD[:, -1]


def selection_mask(block_indices_BxHxTxK: jnp.ndarray, positions_T: jnp.ndarray, kv_len: int,
                   block: int) -> jnp.ndarray:
    """bool `[B, H, T, S]`: key j is in a listed block of its query row and j <= the row's position."""
    key_S = jnp.arange(kv_len)
    listed = jnp.any(block_indices_BxHxTxK[..., None] == (key_S // block), axis=-2)
    return listed & (key_S[None, :] <= positions_T[:, None])


def attend_with_mask(q_BxTxHxD: jnp.ndarray, k_BxSxGxD: jnp.ndarray, v_BxSxGxD: jnp.ndarray,
                     visible_BxHxTxS: jnp.ndarray, implementation=None) -> jnp.ndarray:
    """Dense softmax attention with a per-head mask (heads folded into the batch, as
    `dot_product_attention` takes one mask per row). For the few tokens of a decoding step."""
    B, T, H, D = q_BxTxHxD.shape
    S, G = k_BxSxGxD.shape[1:3]
    fold = lambda x: jnp.repeat(x, H // G, axis=2).transpose(0, 2, 1, 3).reshape(B * H, S, 1, D)  # noqa: E731
    q = q_BxTxHxD.transpose(0, 2, 1, 3).reshape(B * H, T, 1, D)
    o = dot_product_attention(q, fold(k_BxSxGxD), fold(v_BxSxGxD), causal=False,
                              mask=visible_BxHxTxS.reshape(B * H, T, S), implementation=implementation)
    return o.reshape(B, H, T, D).transpose(0, 2, 1, 3)
