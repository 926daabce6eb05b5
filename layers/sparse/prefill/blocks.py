"""Block bookkeeping shared by the training-free selectors: input checks, the causal/segment block
mask, the smallest-cover rule, the vertical-slash -> block conversion, the index-list format of
`block_sparse_attention`, and the recall of the true attention mass (for tests and experiments).

Blocks are square: query block n = rows [n b, (n + 1) b), key block m = keys [m b, (m + 1) b),
positions counted from 0 for queries and keys alike (prefill: T == S). Key block m is causal for
query block n when m <= n. A selector that takes `query_blocks` (int32 [Q], the block index of each
block of q) may be given the rows of some query blocks only (a device's rows under sequence
parallelism) with all S keys; it then lists key blocks for those Q query blocks.
"""

import jax
import jax.numpy as jnp

from hybrax.pallas_kernels.block_sparse_attention.reference import allowed_mask


def check_inputs(q, k, block_size, segment_ids, query_blocks=None) -> tuple[int, int, int]:
    """Raise a one-line ValueError for inputs no selector accepts; return (b, nq, nk). With
    query_blocks, q holds those whole blocks and segment_ids are the keys' [B, S]."""
    if q.ndim != 4 or k.ndim != 4 or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {q.shape} and k {k.shape} must be [B, T, H, D] and [B, S, Hkv, D] with equal B and D")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads={q.shape[2]} must be a multiple of key/value heads={k.shape[2]}")
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"block_size={block_size!r} must be one integer >= 1 (square blocks)")
    if query_blocks is None and q.shape[1] != k.shape[1]:
        raise ValueError(f"prefill selectors need as many keys as queries; got T={q.shape[1]}, S={k.shape[1]}")
    if query_blocks is not None and (query_blocks.ndim != 1 or q.shape[1] != query_blocks.shape[0] * block_size):
        raise ValueError(f"q {q.shape} must hold the {block_size} rows of each of the query_blocks "
                         f"{query_blocks.shape}")
    if segment_ids is not None and segment_ids.shape != k.shape[:2]:
        raise ValueError(f"segment_ids shape {segment_ids.shape} must be [B, S] = {k.shape[:2]}")
    nk = -(-k.shape[1] // block_size)
    return block_size, (nk if query_blocks is None else query_blocks.shape[0]), nk


def check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value:
        raise ValueError(f"{name}={value} must be >= 0 (a fraction of the attention mass; >= 1 keeps every block)")


def heads_of_queries(k_BxSxGxD, num_heads: int):
    """Repeat grouped key heads so key head h // (H // Hkv) serves query head h: [B, S, H, D]."""
    return jnp.repeat(k_BxSxGxD, num_heads // k_BxSxGxD.shape[2], axis=2)


def pad_time(x, length: int):
    """Zero-pad axis 1 (time) up to `length`."""
    return jnp.pad(x, [(0, 0), (0, length - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def visible_blocks(num_blocks: int, block: int, segment_ids):
    """Bool [B or 1, 1, N, N]: key block m may hold a visible key for query block n.

    Causal (m <= n) and, with `segment_ids`, the range [min, max] of segment ids in block n
    overlaps that of block m (conservative: never drops a block holding a same-segment key; exact
    for packed, non-decreasing ids up to gaps in the numbering)."""
    causal_NxN = jnp.tril(jnp.ones((num_blocks, num_blocks), bool))[None, None]
    if segment_ids is None:
        return causal_NxN
    big = jnp.iinfo(jnp.int32).max
    seg = segment_ids.astype(jnp.int32)
    pad = num_blocks * block - seg.shape[1]
    low_BxN = jnp.pad(seg, [(0, 0), (0, pad)], constant_values=big).reshape(seg.shape[0], num_blocks, block).min(-1)
    high_BxN = jnp.pad(seg, [(0, 0), (0, pad)], constant_values=-big).reshape(seg.shape[0], num_blocks, block).max(-1)
    overlap_BxNxN = (low_BxN[:, :, None] <= high_BxN[:, None, :]) & (low_BxN[:, None, :] <= high_BxN[:, :, None])
    return causal_NxN & overlap_BxNxN[:, None]


def with_diagonal(keep_BxHxQxM, query_blocks=None):
    """keep | the diagonal block of each query block (block n, or query_blocks[q])."""
    Q, M = keep_BxHxQxM.shape[-2:]
    query_blocks = jnp.arange(Q) if query_blocks is None else query_blocks
    return keep_BxHxQxM | (query_blocks[:, None] == jnp.arange(M)[None, :])


def smallest_cover(mass, valid, threshold: float):
    """Bool like `mass`: along the last axis, the smallest set of valid entries whose mass is at
    least `threshold` of the valid total (largest first; ties by position). threshold >= 1 keeps
    every valid entry; the kept sets are nested as the threshold grows."""
    mass = jnp.where(valid, mass.astype(jnp.float32), 0.0)
    if threshold >= 1.0:
        return valid
    order = jnp.argsort(-mass, axis=-1, stable=True)
    sorted_mass = jnp.take_along_axis(mass, order, axis=-1)
    before = jnp.cumsum(sorted_mass, axis=-1) - sorted_mass   # mass ranked strictly ahead
    total = jnp.sum(mass, axis=-1, keepdims=True)
    keep_sorted = before < threshold * total
    keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)
    return keep & valid


def keep_top(scores_BxHxS, count: int):
    """Bool [B, H, S]: the `count` highest entries (lowest position first on ties)."""
    B, H, S = scores_BxHxS.shape
    count = min(count, S)
    if count == 0:
        return jnp.zeros((B, H, S), bool)
    _, idx_BxHxC = jax.lax.top_k(scores_BxHxS, count)
    return jnp.zeros((B, H, S), bool).at[jnp.arange(B)[:, None, None], jnp.arange(H)[None, :, None], idx_BxHxC].set(True)


def last_query_lines(q_last_BxLxHxD, k_BxTxHxD, segment_ids):
    """MInference's estimate from the last L queries of the sequence (rows T - L .. T - 1, given
    alone as q_last): their causal softmax rows p [B, H, L, S] summed into vertical lines (per key
    column j) and slash lines (per offset o = i - j >= 0). Returns (vertical [B, H, S], slash
    [B, H, S]) float32; each sums to L (one per query row)."""
    B, L, H, D = q_last_BxLxHxD.shape
    T = k_BxTxHxD.shape[1]
    rows_L = T - L + jnp.arange(L)
    q_last = q_last_BxLxHxD.astype(jnp.float32)
    logits_BxHxLxS = jnp.einsum("blhd,bshd->bhls", q_last, k_BxTxHxD.astype(jnp.float32)) * D ** -0.5
    visible = rows_L[:, None] >= jnp.arange(T)[None, :]
    if segment_ids is not None:
        visible = visible[None, None] & (segment_ids[:, T - L:, None] == segment_ids[:, None, :])[:, None]
    p_BxHxLxS = jax.nn.softmax(jnp.where(visible, logits_BxHxLxS, -jnp.inf), axis=-1)
    p_BxHxLxS = jnp.where(visible, p_BxHxLxS, 0.0)
    vertical_BxHxS = p_BxHxLxS.sum(axis=2)
    key_LxO = rows_L[:, None] - jnp.arange(T)[None, :]          # the key at offset o from row l
    on_line = key_LxO >= 0
    gathered = jnp.take_along_axis(p_BxHxLxS, jnp.broadcast_to(jnp.clip(key_LxO, 0), (B, H, L, T)), axis=-1)
    slash_BxHxS = jnp.where(on_line, gathered, 0.0).sum(axis=2)
    return vertical_BxHxS, slash_BxHxS


def vertical_slash_to_blocks(columns_BxHxS, offsets_BxHxS, block: int, num_blocks: int):
    """Bool [B, H, N, N]: the causal tiles that a kept column or a kept diagonal passes through.

    Column j lists key block j // b for every query block n >= j // b. The diagonal i - j = o meets
    tile (n, m) iff |o - (n - m) b| <= b - 1, i.e. at block distance d = n - m in {o // b, o // b + 1}
    (the second only when o % b != 0)."""
    pad = num_blocks * block - columns_BxHxS.shape[-1]
    B, H = columns_BxHxS.shape[:2]
    columns = jnp.pad(columns_BxHxS, [(0, 0), (0, 0), (0, pad)])
    offsets = jnp.pad(offsets_BxHxS, [(0, 0), (0, 0), (0, pad)]).reshape(B, H, num_blocks, block)
    column_block_BxHxM = columns.reshape(B, H, num_blocks, block).any(-1)
    at_distance = offsets.any(-1)                                              # d = o // b
    spill = offsets[..., 1:].any(-1)                                           # o % b != 0: also d = o // b + 1
    at_distance = at_distance.at[..., 1:].set(at_distance[..., 1:] | spill[..., :-1])
    distance_NxM = jnp.arange(num_blocks)[:, None] - jnp.arange(num_blocks)[None, :]
    causal_NxM = distance_NxM >= 0
    diagonal_tiles = at_distance[..., jnp.clip(distance_NxM, 0)]                # [B, H, N, M]
    return causal_NxM & (diagonal_tiles | column_block_BxHxM[:, :, None, :])


def to_block_indices(keep_BxHxNxM):
    """int32 [B, H, N, M]: the kept key blocks of each query block in ascending order, then -1."""
    M = keep_BxHxNxM.shape[-1]
    ranked = jnp.where(keep_BxHxNxM, jnp.arange(M, dtype=jnp.int32), M)
    ranked = jnp.sort(ranked, axis=-1)
    return jnp.where(ranked == M, -1, ranked).astype(jnp.int32)


def attention_recall(q_BxTxHxD, k_BxSxGxD, block_indices, block_size: int, segment_ids=None):
    """Fraction of each query's dense causal softmax mass (scale D^-0.5) inside its listed blocks:
    float32 [B, H, T]; 1 means the block-sparse output equals the dense one for that row."""
    B, T, H, D = q_BxTxHxD.shape
    k_BxSxHxD = heads_of_queries(k_BxSxGxD, H).astype(jnp.float32)
    logits = jnp.einsum("bthd,bshd->bhts", q_BxTxHxD.astype(jnp.float32), k_BxSxHxD) * D ** -0.5
    visible = jnp.tril(jnp.ones((T, T), bool))[None, None]
    if segment_ids is not None:
        visible = visible & (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    probs = jnp.where(visible, jax.nn.softmax(jnp.where(visible, logits, -jnp.inf), axis=-1), 0.0)
    listed = allowed_mask(block_indices, T, T, block_size=(block_size, block_size), causal=True, segment_ids=None)
    return jnp.sum(jnp.where(listed, probs, 0.0), axis=-1)


def causal_density(block_indices):
    """Listed causal blocks / all causal blocks, over every (batch, head, query block)."""
    N, M = block_indices.shape[-2:]
    listed = jnp.any(block_indices[..., None] == jnp.arange(M), axis=-2) & jnp.tril(jnp.ones((N, M), bool))
    return jnp.sum(listed) / (block_indices.shape[0] * block_indices.shape[1] * N * (N + 1) / 2)
