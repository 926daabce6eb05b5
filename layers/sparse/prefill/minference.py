"""MInference's vertical-slash pattern as key blocks (Jiang et al., 2024, "MInference 1.0:
Accelerating Pre-filling for Long-Context LLMs via Dynamic Sparse Attention").

Rule. Per (batch, head), take the causal softmax rows p of the last `last_q` queries (64) and sum
them into vertical lines v[j] = sum_i p[i, j] (attention to key column j) and slash lines
s[o] = sum_i p[i, i - o] (attention along the diagonal at offset o = i - j >= 0). Keep the top
`vertical_size` columns and the top `slash_size` diagonals (paper defaults 1000 and 6096, tuned
for 128k-token prompts: at short lengths they keep everything, so pass a smaller budget there).

Block conversion (the paper's kernel reads exact columns and diagonals; `block_sparse_attention`
reads whole tiles): key block m is listed for query block n (m <= n) when it contains a kept
column, or a kept diagonal passes through the tile, i.e. |o - (n - m) b| <= b - 1. A listed tile
is read in full, so the block form reads a superset of the paper's entries. The diagonal block
and the first ("sink") key block are always listed; they stand in for the paper's forced first 30
columns and last 100 diagonals, which the block form would round up to the same tiles.

Shapes: q [B, T, H, D], k [B, T, Hkv, D] -> block_indices int32 [B, H, N, N], N = ceil(T / block),
kept blocks ascending then -1. `segment_ids` mask the estimate (same-segment keys only) and drop
blocks that share no segment range with the query block.
"""

import jax.numpy as jnp

from hybrax.layers.sparse.prefill import blocks


LAST_Q = 64


def select_blocks(q, k, *, block_size: int, last_q: int = LAST_Q, vertical_size: int = 1000, slash_size: int = 6096,
                  segment_ids=None):
    """MInference's vertical-slash block lists; see the module docstring."""
    blocks.check_inputs(q, k, block_size, segment_ids)
    return select_from_last_queries(q[:, q.shape[1] - last_query_count(last_q, k.shape[1]):], k, block_size=block_size,
                                    vertical_size=vertical_size, slash_size=slash_size, segment_ids=segment_ids)


def last_query_count(last_q: int, seq_len: int) -> int:
    """How many queries the estimate reads, min(last_q, S) (one-line error for a bad knob)."""
    if not isinstance(last_q, int) or last_q < 1:
        raise ValueError(f"last_q={last_q!r} must be an integer >= 1")
    return min(last_q, seq_len)


def select_from_last_queries(q_last, k, *, block_size: int, vertical_size: int = 1000, slash_size: int = 6096,
                             segment_ids=None):
    """The same lists from the last L queries alone, q_last [B, L, H, D] (rows S - L .. S - 1 of the
    sequence of k [B, S, Hkv, D]): all the estimate reads of q, e.g. the rows that a
    sequence-parallel caller assembles from the devices holding them."""
    b, N = block_size, -(-k.shape[1] // block_size)
    for name, value in (("vertical_size", vertical_size), ("slash_size", slash_size)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}={value!r} must be an integer >= 0")
    H = q_last.shape[2]
    vertical_BxHxT, slash_BxHxT = blocks.last_query_lines(q_last, blocks.heads_of_queries(k, H), segment_ids)
    keep = blocks.vertical_slash_to_blocks(blocks.keep_top(vertical_BxHxT, vertical_size),
                                           blocks.keep_top(slash_BxHxT, slash_size), b, N)
    keep = keep.at[..., 0].set(True)                      # the sink block (causal for every query block)
    keep = blocks.with_diagonal(keep) & blocks.visible_blocks(N, b, segment_ids) | jnp.eye(N, dtype=bool)
    return blocks.to_block_indices(keep)
