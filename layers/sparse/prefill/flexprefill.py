"""FlexPrefill block selection (Lai et al., 2025, "FlexPrefill: A Context-Aware Sparse Attention
Mechanism for Efficient Long-Sequence Inference").

Rule, per (batch, head):

- Query-aware pattern: pool queries and keys by their block means (q̄_n, k̄_m), estimate the block
  attention Â[n, m] = softmax_m(q̄_n . k̄_m / sqrt(D)) over causal key blocks, flatten Â over all
  (n, m) pairs of the head, and keep the smallest set of pairs whose estimated mass is at least
  `gamma` of the total (0.9); as in the paper the budget is shared across query blocks (a sharply
  focused query block gives up entries that a diffuse one takes).
- Vertical-slash pattern: from the causal softmax rows of the last query block, sum vertical
  lines (per key column) and slash lines (per diagonal offset), keep the smallest sets of columns
  and of diagonals whose mass is at least `gamma` of each total, and list the tiles they touch
  (`blocks.vertical_slash_to_blocks`), plus the first (sink) block.
- Pattern switch (`js_threshold`, the paper's tau = 0.1): d = sqrt(JSD(ā, â)) between the pooled
  estimate ā = Â[last block] and the true block mass â of the last query block (its softmax rows
  summed per key block). d < tau: the pooled estimate is trusted and the head uses the
  query-aware pattern; otherwise vertical-slash. js_threshold=None: query-aware for every head.

Implemented as in the paper except its minimum and maximum budgets (min_budget tokens always
kept): here only the diagonal block is always kept. gamma >= 1 keeps every causal block.

Shapes: q [B, T, H, D], k [B, T, Hkv, D] -> block_indices int32 [B, H, N, N], N = ceil(T / block),
kept blocks ascending then -1. `segment_ids` mask the estimates and drop blocks that share no
segment range with the query block.
"""

import jax
import jax.numpy as jnp

from hybrax.layers.sparse.prefill import blocks


def block_means(x_BxTxHxD, block: int):
    """float32 [B, ceil(T / block), H, D]: the mean of each block (a partial last block: of its rows)."""
    B, T, H, D = x_BxTxHxD.shape
    num_blocks = -(-T // block)
    sums = blocks.pad_time(x_BxTxHxD.astype(jnp.float32), num_blocks * block).reshape(B, num_blocks, block, H, D).sum(2)
    counts_N = jnp.minimum(block, T - block * jnp.arange(num_blocks))
    return sums / counts_N[None, :, None, None]


def _jensen_shannon(p, q):
    m = 0.5 * (p + q)
    kl = lambda a: jnp.sum(jnp.where(a > 0, a * (jnp.log(jnp.maximum(a, 1e-30)) - jnp.log(jnp.maximum(m, 1e-30))), 0.0), -1)
    return 0.5 * kl(p) + 0.5 * kl(q)


def select_blocks(q, k, *, block_size: int, gamma: float = 0.9, js_threshold: float | None = 0.1, segment_ids=None):
    """FlexPrefill's per-head block lists; see the module docstring."""
    b, N, _ = blocks.check_inputs(q, k, block_size, segment_ids)
    return select_from_estimates(block_means(q, b), q[:, (N - 1) * b:], k, block_size=b, gamma=gamma,
                                 js_threshold=js_threshold, segment_ids=segment_ids)


def select_from_estimates(q_means, q_last, k, *, block_size: int, gamma: float = 0.9,
                          js_threshold: float | None = 0.1, segment_ids=None):
    """The same lists from all that the estimates read of q: the mean query of every block,
    q_means [B, N, H, D] (`block_means`), and the rows of the last query block, q_last [B, L, H, D]
    (L = S - (N - 1) block), for keys k [B, S, Hkv, D] (e.g. what a sequence-parallel caller
    gathers instead of q)."""
    blocks.check_fraction("gamma", gamma)
    if js_threshold is not None and not js_threshold >= 0:
        raise ValueError(f"js_threshold={js_threshold!r} must be >= 0 or None (query-aware pattern only)")
    b = block_size
    B, N, H, D = q_means.shape
    T = k.shape[1]
    k_BxTxHxD = blocks.heads_of_queries(k, H)
    visible = jnp.broadcast_to(blocks.visible_blocks(N, b, segment_ids), (B, H, N, N))
    # query-aware: pooled block attention, smallest cover over the whole head
    logits_BxHxNxN = jnp.einsum("bnhd,bmhd->bhnm", q_means, block_means(k_BxTxHxD, b)) * D ** -0.5
    pooled = jnp.where(visible, jax.nn.softmax(jnp.where(visible, logits_BxHxNxN, -jnp.inf), axis=-1), 0.0)
    keep = blocks.smallest_cover(pooled.reshape(B, H, N * N), visible.reshape(B, H, N * N), gamma).reshape(B, H, N, N)
    if js_threshold is None or js_threshold == float("inf"):
        return blocks.to_block_indices(blocks.with_diagonal(keep))
    # vertical-slash from the last query block, and the switch between the two
    num_last = q_last.shape[1]
    vertical_BxHxT, slash_BxHxT = blocks.last_query_lines(q_last, k_BxTxHxD, segment_ids)
    inside = jnp.ones((B, H, T), bool)
    keep_vs = blocks.vertical_slash_to_blocks(blocks.smallest_cover(vertical_BxHxT, inside, gamma),
                                              blocks.smallest_cover(slash_BxHxT, inside, gamma), b, N)
    keep_vs = keep_vs.at[..., 0].set(True) & visible
    true_last_BxHxN = blocks.pad_time(jnp.moveaxis(vertical_BxHxT, -1, 1), N * b)
    true_last_BxHxN = jnp.moveaxis(true_last_BxHxN.reshape(B, N, b, H).sum(2), 1, -1) / num_last
    distance_BxH = jnp.sqrt(jnp.maximum(_jensen_shannon(pooled[:, :, -1], true_last_BxHxN), 0.0))
    query_aware_BxH = distance_BxH < js_threshold
    keep = jnp.where(query_aware_BxH[:, :, None, None], keep, keep_vs)
    return blocks.to_block_indices(blocks.with_diagonal(keep))
