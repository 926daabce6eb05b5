"""Training-free block selectors for sparse prefill of a trained softmax model.

Each selector is a pure function `select_blocks(q [B, T, H, D], k [B, T, Hkv, D], *, block_size,
<budget knobs>, segment_ids=None) -> block_indices int32 [B, H, ceil(T / block_size), n_sel]`
(n_sel = number of key blocks; kept blocks ascending, -1 in unused slots), causal, the diagonal
block always listed; `block_sparse_attention` then reads only the listed tiles.

- `xattention`: antidiagonal scoring, cumulative threshold per query block (Xu et al., 2025).
- `minference`: vertical-slash pattern from the last queries, top-k lines (Jiang et al., 2024).
- `flexprefill`: query-aware pooled estimate with a cumulative threshold per head, switching to
  vertical-slash by a Jensen-Shannon test (Lai et al., 2025).

`sparse_prefill_attention` is what the Attention layer calls on its no-cache path. Under a mesh
with seq > 1 (q, k, v in zigzag order, layers/sequence_parallel/layout.py) it runs in shard_map
with local queries against keys and values all-gathered over seq in natural order
(layers/sparse/gathered_keys.py), and lists key blocks for the local query blocks:
xattention scores only them (its estimate is per query row); minference and flexprefill estimate
from queries across the sequence, so the devices assemble just what those estimates read (the last
`last_q` queries; the last query block and every block's mean query, gathered as block means),
every device computes the (cheap) lists for all query blocks and keeps its own rows. Queries are
never all-gathered; the attention is computed for the local queries only.
"""

import functools
import inspect
from collections.abc import Mapping

import jax

from hybrax.layers.partitioned import block_sparse_attention
from hybrax.layers.sparse.gathered_keys import (attend_with_gathered_keys, gather_natural, natural_rows,
                                                    offset_implementation)
from hybrax.layers.sequence_parallel.layout import seq_size
from hybrax.layers.sparse.prefill import flexprefill, minference, xattention

SELECTORS = {
    "xattention": xattention.select_blocks,
    "minference": minference.select_blocks,
    "flexprefill": flexprefill.select_blocks,
}


def check_options(selector: str, options: Mapping[str, object]) -> None:
    """Raise a one-line ValueError for an unknown selector or a knob it does not take."""
    if selector not in SELECTORS:
        raise ValueError(f"sparse prefill selector {selector!r} is unknown; valid: {sorted(SELECTORS)}")
    knobs = [name for name, p in inspect.signature(SELECTORS[selector]).parameters.items()
             if p.kind is p.KEYWORD_ONLY and name not in ("block_size", "segment_ids")]
    for name in options:
        if name not in knobs:
            raise ValueError(f"sparse prefill option {name!r} is not a knob of {selector!r}; valid: {knobs}")


def sparse_prefill_attention(q, k, v, *, selector: str, block_size: int, options: Mapping[str, object] = {},
                             segment_ids=None, implementation=None):
    """Causal softmax attention over the key blocks that `selector` lists: o [B, T, H, D].

    The selection is a discrete, data-dependent choice and carries no gradient (stop_gradient).
    Sequence-parallel under a mesh with seq > 1 (see the module docstring)."""
    check_options(selector, options)
    if seq_size() > 1:
        local = functools.partial(_local_queries, selector=selector, options=options, implementation=implementation)
        return attend_with_gathered_keys(local, q, k, v, segment_ids, block=block_size)
    block_indices = SELECTORS[selector](jax.lax.stop_gradient(q), jax.lax.stop_gradient(k), block_size=block_size,
                                        segment_ids=segment_ids, **options)
    return block_sparse_attention(q, k, v, block_indices, block_size=(block_size, block_size), causal=True,
                                  segment_ids=segment_ids, implementation=implementation)


def _local_queries(q, k, v, q_segment_ids, kv_segment_ids, query_block_Q, head_axes, *, selector, options,
                   implementation):
    """Inside shard_map: this device's query blocks `query_block_Q` of q against all keys (natural order)."""
    b = q.shape[1] // query_block_Q.shape[0]
    q_fixed, k_fixed = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
    block_indices = _local_lists(selector, q_fixed, k_fixed, kv_segment_ids, query_block_Q, b, dict(options))
    return block_sparse_attention(q, k, v, block_indices, block_size=(b, b), causal=True, segment_ids=q_segment_ids,
                                  kv_segment_ids=kv_segment_ids, query_blocks=query_block_Q,
                                  implementation=offset_implementation(implementation))


def _local_lists(selector, q, k, segment_ids, query_block_Q, b, options):
    """The selector's lists [B, H, Q, N] for the local query blocks, from local queries and all keys."""
    if selector == "xattention":
        return xattention.select_blocks(q, k, block_size=b, segment_ids=segment_ids, query_blocks=query_block_Q,
                                        **options)
    S, devices = k.shape[1], seq_size()
    if selector == "minference":
        count = minference.last_query_count(options.pop("last_q", minference.LAST_Q), S)
        lists = minference.select_from_last_queries(natural_rows(q, S - count, count, devices), k, block_size=b,
                                                    segment_ids=segment_ids, **options)
    else:
        q_means = gather_natural(flexprefill.block_means(q, b), devices)
        last_block = (S - 1) // b * b
        lists = flexprefill.select_from_estimates(q_means, natural_rows(q, last_block, S - last_block, devices), k,
                                                  block_size=b, segment_ids=segment_ids, **options)
    return lists[:, :, query_block_Q]
