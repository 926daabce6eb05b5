"""Block-sparse softmax attention behind the implementation switch.

`block_sparse_attention(q [B, T, H, D], k [B, S, Hkv, D], v [B, S, Hkv, D], block_indices
int32 [B, H, ceil(T / block_q), n_sel], *, block_size=(block_q, block_k), causal=True, scale=None,
segment_ids=None [B, T], implementation=None) -> o [B, T, H, D]`

Query block n = rows [n * block_q, (n + 1) * block_q) attends only to the key blocks listed in
`block_indices[b, h, n]` (key block m = keys [m * block_k, (m + 1) * block_k)); -1 marks an unused
slot, a block listed twice counts once. Softmax runs over the keys of the listed blocks,
intersected with the causal mask (query position >= key position, both counted from 0) and with
`segment_ids` (same segment) when given; all three must hold. A query row with no visible key
outputs zeros. `scale` defaults to D ** -0.5. H must be a multiple of Hkv (grouped queries:
query head h reads key/value head h // (H // Hkv)).

Implementations: `reference` (dense masked attention, the oracle), `xla` (gathers only the listed
blocks: memory and time grow with n_sel, not with S), `pallas_tpu`, `pallas_gpu` (flash-style
kernels with the index lists prefetched as scalars; interpret mode when forced on a CPU) and
`pallas` (pallas_tpu on TPU, pallas_gpu on GPU). Default order: TPU (pallas_tpu, xla); GPU
(pallas_gpu, xla); CPU (xla,).

Validation raises a one-line ValueError before any compute. The range check of block_indices
needs the values, so it runs only on concrete arrays (eager calls); under jit the indices are
tracers and go unchecked (out-of-range entries must not be passed).
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_sparse_attention import reference
from pallas_kernels.implementation import dispatch, lazy_backend, pallas_for_backend


_pallas_tpu = lazy_backend("pallas_kernels.block_sparse_attention", "tpu", "block_sparse_attention")
_pallas_gpu = lazy_backend("pallas_kernels.block_sparse_attention", "gpu", "block_sparse_attention")
_pallas = pallas_for_backend(_pallas_tpu, _pallas_gpu)


IMPLEMENTATIONS = {
    "reference": reference.block_sparse_attention,
    "xla": lazy_backend("pallas_kernels.block_sparse_attention", "xla", "block_sparse_attention"),
    "pallas_tpu": _pallas_tpu,
    "pallas_gpu": _pallas_gpu,
    "pallas": _pallas,
}
DEFAULTS = {"tpu": ("pallas_tpu", "xla"), "gpu": ("pallas_gpu", "xla"), "default": ("xla",)}


def _block_size(block_size) -> tuple[int, int]:
    if isinstance(block_size, (int, np.integer)) and not isinstance(block_size, bool):
        block_size = (block_size, block_size)
    if (not isinstance(block_size, (tuple, list)) or len(block_size) != 2
            or not all(isinstance(b, (int, np.integer)) and not isinstance(b, bool) and b >= 1 for b in block_size)):
        raise ValueError(f"block_size={block_size!r} must be (block_q, block_k), two integers >= 1")
    return int(block_size[0]), int(block_size[1])


def check_inputs(q, k, v, block_indices, block_size, segment_ids) -> None:
    """Raise a one-line ValueError for inputs the op does not accept."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [batch, time, heads, dim]; got shapes {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"k {k.shape} and v {v.shape} must equal each other and match q {q.shape} in batch and dim")
    B, T, H, _ = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    if H % Hkv:
        raise ValueError(f"query heads={H} must be a multiple of key/value heads={Hkv}")
    block_q, block_k = block_size
    num_q_blocks, num_kv_blocks = -(-T // block_q), -(-S // block_k)
    if block_indices.ndim != 4 or block_indices.shape[:3] != (B, H, num_q_blocks):
        raise ValueError(f"block_indices shape {block_indices.shape} must be [B, H, ceil(T / block_q), n_sel] = "
                         f"[{B}, {H}, {num_q_blocks}, n_sel]")
    if not jnp.issubdtype(block_indices.dtype, jnp.integer):
        raise ValueError(f"block_indices dtype {block_indices.dtype} must be an integer dtype")
    if not isinstance(block_indices, jax.core.Tracer) and block_indices.size:
        values = np.asarray(block_indices)
        low, high = int(values.min()), int(values.max())
        if low < -1 or high >= num_kv_blocks:
            raise ValueError(f"block_indices range [{low}, {high}] must lie in [-1, {num_kv_blocks - 1}] "
                             f"(S={S} keys in blocks of {block_k}; -1 = unused slot)")
    if segment_ids is not None:
        if T != S or segment_ids.shape != (B, T):
            raise ValueError(f"segment_ids shape {segment_ids.shape} must be [B, T] = {(B, T)} with as many keys "
                             f"as queries (S={S})")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"segment_ids dtype {segment_ids.dtype} must be an integer dtype")


def block_sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, block_indices: jax.Array, *,
                           block_size: int | tuple[int, int], causal: bool = True, scale: float | None = None,
                           segment_ids: jax.Array | None = None,
                           implementation: str | Sequence[str] | None = None) -> jax.Array:
    """Softmax attention over the listed key blocks; see the module docstring for the contract."""
    block_size = _block_size(block_size)
    check_inputs(q, k, v, block_indices, block_size, segment_ids)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    return dispatch("block_sparse_attention", IMPLEMENTATIONS, DEFAULTS, implementation, q, k, v,
                    block_indices.astype(jnp.int32), block_size=block_size, causal=bool(causal), scale=scale,
                    segment_ids=segment_ids)
