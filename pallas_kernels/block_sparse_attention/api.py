"""Block-sparse softmax attention behind the implementation switch.

`block_sparse_attention(q [B, T, H, D], k [B, S, Hkv, D], v [B, S, Hkv, D], block_indices
int32 [B, H, ceil(T / block_q), n_sel], *, block_size=(block_q, block_k), causal=True, scale=None,
segment_ids=None [B, T], query_blocks=None [ceil(T / block_q)], kv_segment_ids=None [B, S],
implementation=None) -> o [B, T, H, D]`

Query block n = rows [n * block_q, (n + 1) * block_q) attends only to the key blocks listed in
`block_indices[b, h, n]` (key block m = keys [m * block_k, (m + 1) * block_k)); -1 marks an unused
slot, a block listed twice counts once. Softmax runs over the keys of the listed blocks,
intersected with the causal mask (query position >= key position, both counted from 0) and with
`segment_ids` (same segment) when given; all three must hold. A query row with no visible key
outputs zeros. `scale` defaults to D ** -0.5. H must be a multiple of Hkv (grouped queries:
query head h reads key/value head h // (H // Hkv)).

Queries at other positions than 0..T-1 (a device's rows under sequence parallelism, with all S
keys gathered): `query_blocks` int32 [ceil(T / block_q)] gives the block index, in key positions,
of each query block, so query row i sits at position query_blocks[i // block_q] * block_q +
i % block_q for the causal mask; `kv_segment_ids` [B, S] then gives the keys' segments
(`segment_ids` [B, T] stays the queries'). Without them the queries are the keys' own positions
and T == S is required with segment_ids. Only `reference` and `xla` take them; the Pallas kernels
raise NotImplementedError, so the default order falls through to xla.

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

from hybrax.pallas_kernels.block_sparse_attention import reference
from hybrax.pallas_kernels.implementation import dispatch, lazy_backend, pallas_for_backend


_pallas_tpu = lazy_backend("hybrax.pallas_kernels.block_sparse_attention", "tpu", "block_sparse_attention")
_pallas_gpu = lazy_backend("hybrax.pallas_kernels.block_sparse_attention", "gpu", "block_sparse_attention")
_pallas = pallas_for_backend(_pallas_tpu, _pallas_gpu)


IMPLEMENTATIONS = {
    "reference": reference.block_sparse_attention,
    "xla": lazy_backend("hybrax.pallas_kernels.block_sparse_attention", "xla", "block_sparse_attention"),
    "pallas_tpu": _pallas_tpu,
    "pallas_gpu": _pallas_gpu,
    "pallas": _pallas,
}
DEFAULTS = {"tpu": ("pallas_tpu", "xla"), "gpu": ("pallas_gpu", "xla"), "default": ("xla",)}
QUERY_BLOCK_IMPLEMENTATIONS = ("reference", "xla")   # the ones that take query_blocks / kv_segment_ids


def _natural_queries_only(name: str):
    def refuse(*args, **kwargs):
        raise NotImplementedError(f"{name} takes queries at positions 0..T-1 only (no query_blocks, kv_segment_ids)")
    return refuse


def _block_size(block_size) -> tuple[int, int]:
    if isinstance(block_size, (int, np.integer)) and not isinstance(block_size, bool):
        block_size = (block_size, block_size)
    if (not isinstance(block_size, (tuple, list)) or len(block_size) != 2
            or not all(isinstance(b, (int, np.integer)) and not isinstance(b, bool) and b >= 1 for b in block_size)):
        raise ValueError(f"block_size={block_size!r} must be (block_q, block_k), two integers >= 1")
    return int(block_size[0]), int(block_size[1])


def check_inputs(q, k, v, block_indices, block_size, segment_ids, query_blocks=None, kv_segment_ids=None) -> None:
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
    if query_blocks is not None and (query_blocks.shape != (num_q_blocks,)
                                     or not jnp.issubdtype(query_blocks.dtype, jnp.integer)):
        raise ValueError(f"query_blocks shape {query_blocks.shape} dtype {query_blocks.dtype} must be integer "
                         f"[ceil(T / block_q)] = [{num_q_blocks}]")
    if kv_segment_ids is not None:
        integer = jnp.issubdtype(kv_segment_ids.dtype, jnp.integer)
        if segment_ids is None or kv_segment_ids.shape != (B, S) or not integer:
            raise ValueError(f"kv_segment_ids {kv_segment_ids.shape} {kv_segment_ids.dtype} must be integer [B, S] = "
                             f"{(B, S)} and come with the queries' segment_ids")
    if segment_ids is not None:
        if segment_ids.shape != (B, T) or (kv_segment_ids is None and T != S):
            raise ValueError(f"segment_ids shape {segment_ids.shape} must be [B, T] = {(B, T)} with as many keys "
                             f"as queries (S={S}) unless kv_segment_ids are given")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"segment_ids dtype {segment_ids.dtype} must be an integer dtype")


def block_sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, block_indices: jax.Array, *,
                           block_size: int | tuple[int, int], causal: bool = True, scale: float | None = None,
                           segment_ids: jax.Array | None = None, query_blocks: jax.Array | None = None,
                           kv_segment_ids: jax.Array | None = None,
                           implementation: str | Sequence[str] | None = None) -> jax.Array:
    """Softmax attention over the listed key blocks; see the module docstring for the contract."""
    block_size = _block_size(block_size)
    check_inputs(q, k, v, block_indices, block_size, segment_ids, query_blocks, kv_segment_ids)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    args = (q, k, v, block_indices.astype(jnp.int32))
    options = dict(block_size=block_size, causal=bool(causal), scale=scale, segment_ids=segment_ids)
    if query_blocks is None and kv_segment_ids is None:
        return dispatch("block_sparse_attention", IMPLEMENTATIONS, DEFAULTS, implementation, *args, **options)
    table = {name: fn if name in QUERY_BLOCK_IMPLEMENTATIONS else _natural_queries_only(name)
             for name, fn in IMPLEMENTATIONS.items()}
    return dispatch("block_sparse_attention", table, DEFAULTS, implementation, *args, **options,
                    query_blocks=query_blocks, kv_segment_ids=kv_segment_ids)
