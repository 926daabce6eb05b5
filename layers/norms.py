"""RMSNorm (Zhang & Sennrich, 2019): y = x / sqrt(mean(x^2) + eps) * scale, computed in float32."""

import jax.numpy as jnp
from flax import nnx

from hybrax.layers.parameters import logical_param, ones


class RMSNorm(nnx.Module):
    """Root-mean-square norm over the last axis; `d` parameters."""

    def __init__(self, dim: int, *, eps: float = 1e-6, dtype="float32", param_dtype="float32",
                 rngs: nnx.Rngs):
        self.eps = eps
        self.dtype = jnp.dtype(dtype)
        self.scale = logical_param(rngs, ones(), (dim,), param_dtype, ("embed",))

    def __call__(self, x_BxTxD: jnp.ndarray) -> jnp.ndarray:
        x = x_BxTxD.astype(jnp.float32)
        x = x * jnp.reciprocal(jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps))
        return (x * self.scale[...].astype(jnp.float32)).astype(self.dtype)
