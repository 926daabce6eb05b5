"""Training-free block selectors for sparse prefill of a trained softmax model.

Each selector is a pure function `select_blocks(q [B, T, H, D], k [B, T, Hkv, D], *, block_size,
<budget knobs>, segment_ids=None) -> block_indices int32 [B, H, ceil(T / block_size), n_sel]`
(n_sel = number of key blocks; kept blocks ascending, -1 in unused slots), causal, the diagonal
block always listed; `block_sparse_attention` then reads only the listed tiles.

- `xattention`: antidiagonal scoring, cumulative threshold per query block (Xu et al., 2025).
- `minference`: vertical-slash pattern from the last queries, top-k lines (Jiang et al., 2024).
- `flexprefill`: query-aware pooled estimate with a cumulative threshold per head, switching to
  vertical-slash by a Jensen-Shannon test (Lai et al., 2025).

`sparse_prefill_attention` is what the Attention layer calls on its no-cache path.
"""

import inspect
from collections.abc import Mapping

import jax

from layers.sparse_prefill import flexprefill, minference, xattention
from pallas_kernels.block_sparse_attention import block_sparse_attention

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

    The selection is a discrete, data-dependent choice and carries no gradient (stop_gradient)."""
    check_options(selector, options)
    block_indices = SELECTORS[selector](jax.lax.stop_gradient(q), jax.lax.stop_gradient(k), block_size=block_size,
                                        segment_ids=segment_ids, **options)
    return block_sparse_attention(q, k, v, block_indices, block_size=(block_size, block_size), causal=True,
                                  segment_ids=segment_ids, implementation=implementation)
