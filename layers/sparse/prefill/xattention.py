"""XAttention block selection (Xu et al., 2025, "XAttention: Block Sparse Attention with
Antidiagonal Scoring").

Rule. Cut the score matrix into stride x stride tiles (stride s = 8) and score each tile by the
mean of its antidiagonal, which meets every row and every column of the tile once:

    a[r, c] = (1 / s) sum_i q[r s + s - 1 - i] . k[c s + i] / sqrt(D)          (coarse logits)

(one matmul of the stride-reshaped q and k, 1/s of the dense cost). Softmax each coarse query
row over its causal coarse keys (c <= r; the paper's estimate), sum the probabilities of the
rows and columns of each (query block, key block) pair into the block mass A[n, m], normalise
each query block's row, and keep the smallest set of key blocks whose estimated mass is at least
`threshold` (tau = 0.9); the diagonal block is always kept. threshold >= 1 keeps every causal
block. With `segment_ids`, key blocks that share no segment range with the query block are
masked before the softmax (see `blocks.visible_blocks`).

Shapes: q [B, T, H, D], k [B, T, Hkv, D] -> block_indices int32 [B, H, N, N], N = ceil(T / block),
kept blocks ascending then -1. block_size must be a multiple of stride. Every row of the estimate
is one query's, so a subset of the query blocks can be scored alone: with `query_blocks` [Q], q
holds those blocks' rows [B, Q block, H, D] (k, segment_ids all S positions) and the lists are
[B, H, Q, N], the rows of the full answer (a device's queries under sequence parallelism).
"""

import jax
import jax.numpy as jnp

from hybrax.layers.sparse.prefill import blocks


def select_blocks(q, k, *, block_size: int, threshold: float = 0.9, stride: int = 8, segment_ids=None,
                  query_blocks=None):
    """XAttention's antidiagonal-scored block lists; see the module docstring."""
    b, Q, N = blocks.check_inputs(q, k, block_size, segment_ids, query_blocks)
    blocks.check_fraction("threshold", threshold)
    if not isinstance(stride, int) or stride < 1 or b % stride:
        raise ValueError(f"stride={stride!r} must be an integer >= 1 dividing block_size={b}")
    B, _, H, D = q.shape
    S = k.shape[1]
    query_blocks = jnp.arange(Q) if query_blocks is None else query_blocks
    per_block = b // stride
    R, C = Q * per_block, N * per_block                  # coarse rows (of the given queries), coarse columns
    q_BxRxsxHxD = blocks.pad_time(q.astype(jnp.float32), Q * b).reshape(B, R, stride, H, D)
    k_BxCxsxHxD = blocks.pad_time(blocks.heads_of_queries(k, H).astype(jnp.float32), N * b).reshape(B, C, stride, H, D)
    # q rows reversed inside each stride group: pairing row s-1-i with column i walks the antidiagonal
    logits_BxHxRxC = jnp.einsum("brihd,bcihd->bhrc", q_BxRxsxHxD[:, :, ::-1], k_BxCxsxHxD) * (D ** -0.5 / stride)
    visible_Bx1xQxN = blocks.visible_blocks(N, b, segment_ids)[:, :, query_blocks]
    visible_RxC = jnp.repeat(jnp.repeat(visible_Bx1xQxN, per_block, -2), per_block, -1)
    row_R = (query_blocks[:, None] * per_block + jnp.arange(per_block)).reshape(-1)   # coarse row in the sequence
    column_C = jnp.arange(C)
    visible_RxC = visible_RxC & (row_R[:, None] >= column_C[None, :]) & (column_C[None, :] * stride < S)
    probs = jnp.where(visible_RxC, jax.nn.softmax(jnp.where(visible_RxC, logits_BxHxRxC, -jnp.inf), axis=-1), 0.0)
    probs = jnp.where((row_R * stride < S)[:, None], probs, 0.0)          # rows of padding only
    mass_BxHxQxN = probs.reshape(B, H, Q, per_block, N, per_block).sum(axis=(3, 5))
    valid = jnp.broadcast_to(visible_Bx1xQxN, mass_BxHxQxN.shape)
    keep = blocks.smallest_cover(mass_BxHxQxN, valid, threshold)
    return blocks.to_block_indices(blocks.with_diagonal(keep, query_blocks))
