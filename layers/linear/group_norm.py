"""Head-wise RMSNorm for mixer outputs, optionally gated (the output norms of Lightning, GLA, Mamba-2).

    per_head=True:   y[b,t,h] = o[b,t,h] / rms(o[b,t,h]) * scale[h]          (one group per head)
    per_head=False:  y[b,t]   = o[b,t]   / rms(o[b,t, all heads]) * scale    (one group, Mamba-2)
    gate given:      o is first multiplied by silu(gate) (Mamba-2's gated RMSNorm, norm after gate)

Shapes: o, gate `[B, T, H, D]`; scale `[H, D]` (H * D parameters). Computed in float32.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from hybrax.layers.parameters import logical_param, ones


class HeadRMSNorm(nnx.Module):
    def __init__(self, num_heads: int, head_dim: int, *, per_head: bool = True, eps: float = 1e-5,
                 dtype="float32", param_dtype="float32", rngs: nnx.Rngs):
        self.per_head = per_head
        self.eps = eps
        self.dtype = jnp.dtype(dtype)
        self.scale = logical_param(rngs, ones(), (num_heads, head_dim), param_dtype, ("heads", "head_dim"))

    def __call__(self, o_BxTxHxD: jnp.ndarray, gate_BxTxHxD: jnp.ndarray | None = None) -> jnp.ndarray:
        o = o_BxTxHxD.astype(jnp.float32)
        if gate_BxTxHxD is not None:
            o = o * jax.nn.silu(gate_BxTxHxD.astype(jnp.float32))
        axes = (-1,) if self.per_head else (-2, -1)
        o = o * jax.lax.rsqrt(jnp.mean(o * o, axis=axes, keepdims=True) + self.eps)
        return (o * self.scale[...].astype(jnp.float32)).astype(self.dtype)
