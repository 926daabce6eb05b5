"""Block-sparse softmax attention by definition, float32, dense: every score is computed and the
keys outside the listed blocks (or in the future, or in another segment) are masked out.

    allowed[b, h, i, j] = (j // block_k) in block_indices[b, h, i // block_q, :]
                          AND (not causal or pos(i) >= j) AND segment_ids[b, i] == kv_segment_ids[b, j]
    pos(i) = query_blocks[i // block_q] * block_q + i % block_q         (= i without query_blocks)
    kv_segment_ids = segment_ids without kv_segment_ids                 (then T == S)
    o[b, i, h] = sum_j softmax_j(scale * q[b, i, h] . k[b, j, g(h)]) v[b, j, g(h)]   over allowed j

g(h) = h // (H // Hkv) (grouped queries). Rows with no allowed key return zeros. Memory is
O(B H T S): the oracle for tests, never the fast path.
"""

import jax
import jax.numpy as jnp


def allowed_mask(block_indices, q_len: int, kv_len: int, *, block_size, causal, segment_ids, query_blocks=None,
                 kv_segment_ids=None):
    """Boolean [B, H, T, S]: which key each query row may see."""
    block_q, block_k = block_size
    num_kv_blocks = -(-kv_len // block_k)
    # listed[b, h, n, m]: key block m is listed for query block n (slots of -1 list nothing)
    listed_BxHxNxM = jnp.any(block_indices[..., None] == jnp.arange(num_kv_blocks), axis=-2)
    q_block_T = jnp.arange(q_len) // block_q
    k_block_S = jnp.arange(kv_len) // block_k
    allowed = listed_BxHxNxM[:, :, q_block_T][:, :, :, k_block_S]
    if causal:
        q_pos_T = jnp.arange(q_len)
        if query_blocks is not None:
            q_pos_T = query_blocks[q_block_T] * block_q + q_pos_T % block_q
        allowed &= q_pos_T[:, None] >= jnp.arange(kv_len)[None, :]
    if segment_ids is not None:
        kv_segment_ids = segment_ids if kv_segment_ids is None else kv_segment_ids
        allowed &= (segment_ids[:, :, None] == kv_segment_ids[:, None, :])[:, None]
    return allowed


def block_sparse_attention(q, k, v, block_indices, *, block_size, causal, scale, segment_ids, query_blocks=None,
                           kv_segment_ids=None):
    B, T, H, D = q.shape
    groups = H // k.shape[2]
    k_BxSxHxD = jnp.repeat(k, groups, axis=2).astype(jnp.float32)
    v_BxSxHxD = jnp.repeat(v, groups, axis=2).astype(jnp.float32)
    scores_BxHxTxS = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k_BxSxHxD) * scale
    allowed_BxHxTxS = allowed_mask(block_indices, T, k.shape[1], block_size=block_size, causal=causal,
                                   segment_ids=segment_ids, query_blocks=query_blocks, kv_segment_ids=kv_segment_ids)
    scores_BxHxTxS = jnp.where(allowed_BxHxTxS, scores_BxHxTxS, -jnp.inf)
    weights = jax.nn.softmax(scores_BxHxTxS, axis=-1)
    weights = jnp.where(allowed_BxHxTxS, weights, 0.0)  # rows with no allowed key: 0, not NaN
    return jnp.einsum("bhts,bshd->bthd", weights, v_BxSxHxD).astype(q.dtype)
