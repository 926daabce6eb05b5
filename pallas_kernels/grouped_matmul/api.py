"""Grouped matmul (the expert matmuls of a dropless mixture-of-experts FFN) behind the
implementation switch.

`grouped_matmul(lhs [M, K], rhs [G, K, N], group_sizes int [G], *, preferred_element_type=None,
implementation=None) -> [M, N]`, the semantics of `jax.lax.ragged_dot`:

    out[r] = lhs[r] @ rhs[g]   for start_g <= r < start_g + group_sizes[g],
             start_g = group_sizes[0] + ... + group_sizes[g - 1]
    out[r] = 0                 for r >= sum(group_sizes)

Rows of lhs are sorted by group; empty groups are allowed. Products accumulate in float32; the
output dtype is `preferred_element_type` or lhs.dtype. Differentiable in lhs and rhs (the
gradients come back in their dtypes; group_sizes has none).

Implementations: `reference` (a masked dense product per group, float32: the oracle), `xla`
(batched matmuls over groups padded to a common capacity, a loop over row tiles for skewed loads:
the CPU path, see xla.py), `ragged_dot` (`jax.lax.ragged_dot`: XLA's native op, good on GPU and
TPU, G-fold work on CPU) and `pallas_tpu` (megablox `gmm` / `tgmm` kernels; interpret mode when
forced on a CPU). Default order: TPU (pallas_tpu, ragged_dot, xla); GPU (ragged_dot, xla);
CPU (xla,).

Validation raises a one-line ValueError before any compute. The values of group_sizes
(>= 0, sum <= M) are checked only on concrete arrays (eager calls); under jit they go unchecked
and must not be passed out of range.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hybrax.pallas_kernels.grouped_matmul import reference
from hybrax.pallas_kernels.implementation import dispatch, lazy_backend

IMPLEMENTATIONS = {
    "reference": reference.grouped_matmul,
    "xla": lazy_backend("hybrax.pallas_kernels.grouped_matmul", "xla", "grouped_matmul"),
    "ragged_dot": lazy_backend("hybrax.pallas_kernels.grouped_matmul", "ragged_dot", "grouped_matmul"),
    "pallas_tpu": lazy_backend("hybrax.pallas_kernels.grouped_matmul", "tpu", "grouped_matmul"),
}
DEFAULTS = {"tpu": ("pallas_tpu", "ragged_dot", "xla"), "gpu": ("ragged_dot", "xla"), "default": ("xla",)}


def check_inputs(lhs, rhs, group_sizes, preferred_element_type) -> None:
    """Raise a one-line ValueError for inputs the op does not accept."""
    if lhs.ndim != 2:
        raise ValueError(f"lhs must be [M, K]; got shape {lhs.shape}")
    if rhs.ndim != 3:
        raise ValueError(f"rhs must be [G, K, N]; got shape {rhs.shape}")
    if lhs.shape[1] != rhs.shape[1]:
        raise ValueError(f"lhs K={lhs.shape[1]} must equal rhs K={rhs.shape[1]} (lhs {lhs.shape}, rhs {rhs.shape})")
    for name, x in (("lhs", lhs), ("rhs", rhs)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} dtype {x.dtype} must be a float dtype")
    if preferred_element_type is not None and not jnp.issubdtype(preferred_element_type, jnp.floating):
        raise ValueError(f"preferred_element_type={preferred_element_type!r} must be None or a float dtype")
    if group_sizes.shape != rhs.shape[:1]:
        raise ValueError(f"group_sizes shape {group_sizes.shape} must be [G] = ({rhs.shape[0]},), one size per "
                         f"group of rhs {rhs.shape}")
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"group_sizes dtype {group_sizes.dtype} must be an integer dtype")
    if not isinstance(group_sizes, jax.core.Tracer) and group_sizes.size:
        sizes = np.asarray(group_sizes, np.int64)
        if sizes.min() < 0 or sizes.sum() > lhs.shape[0]:
            raise ValueError(f"group_sizes (min {sizes.min()}, sum {sizes.sum()}) must be >= 0 with sum <= "
                             f"M={lhs.shape[0]} rows of lhs")


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
                   preferred_element_type: jnp.dtype | None = None,
                   implementation: str | Sequence[str] | None = None) -> jax.Array:
    """out[r] = lhs[r] @ rhs[group of row r]; see the module docstring for the contract."""
    group_sizes = jnp.asarray(group_sizes)
    check_inputs(lhs, rhs, group_sizes, preferred_element_type)
    out_dtype = None if preferred_element_type is None else jnp.dtype(preferred_element_type)
    return dispatch("grouped_matmul", IMPLEMENTATIONS, DEFAULTS, implementation, lhs, rhs,
                    group_sizes.astype(jnp.int32), preferred_element_type=out_dtype)
