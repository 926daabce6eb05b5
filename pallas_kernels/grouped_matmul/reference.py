"""Grouped matmul by definition, float32: group g owns rows [start_g, start_g + size_g) of lhs
(start_g = size_0 + ... + size_{g-1}) and multiplies them by rhs[g]; rows after the last group
are 0. Every row is multiplied by every group's weight and masked: G times the work of the op,
the oracle for tests and never the fast path.
"""

import jax
import jax.numpy as jnp


def grouped_matmul(lhs, rhs, group_sizes, *, preferred_element_type):
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    row = jnp.arange(lhs.shape[0])
    owns_GxM = (row[None, :] >= starts[:, None]) & (row[None, :] < ends[:, None])
    y_GxMxN = jnp.einsum("mk,gkn->gmn", lhs.astype(jnp.float32), rhs.astype(jnp.float32),
                         precision=jax.lax.Precision.HIGHEST)
    out_MxN = jnp.sum(jnp.where(owns_GxM[:, :, None], y_GxMxN, 0.0), axis=0)
    return out_MxN.astype(preferred_element_type or lhs.dtype)
