"""Weight projections in the compute dtype with float32 accumulation.

Asking the dot for float32 output and casting back is what lets XLA pick fast bf16 kernels
(AMX on CPU, tensor cores on GPU) instead of a bf16-accumulating fallback, and keeps the sums
accurate.
"""

import jax.numpy as jnp
from flax import nnx


def project(spec: str, x: jnp.ndarray, weight: nnx.Param, dtype: jnp.dtype) -> jnp.ndarray:
    """`einsum(spec, x, weight)` computed in `dtype`, accumulated in float32, returned in `dtype`."""
    dtype = jnp.dtype(dtype)
    out = jnp.einsum(spec, x.astype(dtype), weight[...].astype(dtype), preferred_element_type=jnp.float32)
    return out.astype(dtype)
