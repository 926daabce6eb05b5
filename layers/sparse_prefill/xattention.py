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
kept blocks ascending then -1. block_size must be a multiple of stride.
"""

import jax
import jax.numpy as jnp

from layers.sparse_prefill import blocks


def select_blocks(q, k, *, block_size: int, threshold: float = 0.9, stride: int = 8, segment_ids=None):
    """XAttention's antidiagonal-scored block lists; see the module docstring."""
    b, N, _ = blocks.check_inputs(q, k, block_size, segment_ids)
    blocks.check_fraction("threshold", threshold)
    if not isinstance(stride, int) or stride < 1 or b % stride:
        raise ValueError(f"stride={stride!r} must be an integer >= 1 dividing block_size={b}")
    B, T, H, D = q.shape
    R = N * b // stride                                  # coarse rows (= coarse columns)
    q_BxRxsxHxD = blocks.pad_time(q.astype(jnp.float32), N * b).reshape(B, R, stride, H, D)
    k_BxRxsxHxD = blocks.pad_time(blocks.heads_of_queries(k, H).astype(jnp.float32), N * b).reshape(B, R, stride, H, D)
    # q rows reversed inside each stride group: pairing row s-1-i with column i walks the antidiagonal
    logits_BxHxRxR = jnp.einsum("brihd,bcihd->bhrc", q_BxRxsxHxD[:, :, ::-1], k_BxRxsxHxD) * (D ** -0.5 / stride)
    per_block = b // stride
    visible_RxR = jnp.repeat(jnp.repeat(blocks.visible_blocks(N, b, segment_ids), per_block, -2), per_block, -1)
    coarse = jnp.arange(R)
    visible_RxR = visible_RxR & (coarse[:, None] >= coarse[None, :]) & (coarse[None, :] * stride < T)
    probs = jnp.where(visible_RxR, jax.nn.softmax(jnp.where(visible_RxR, logits_BxHxRxR, -jnp.inf), axis=-1), 0.0)
    probs = jnp.where((coarse * stride < T)[:, None], probs, 0.0)          # rows of padding only
    mass_BxHxNxN = probs.reshape(B, H, N, per_block, N, per_block).sum(axis=(3, 5))
    valid = jnp.broadcast_to(blocks.visible_blocks(N, b, segment_ids), mass_BxHxNxN.shape)
    keep = blocks.smallest_cover(mass_BxHxNxN, valid, threshold)
    return blocks.to_block_indices(blocks.with_diagonal(keep))
