"""The definition of the routed output, for tests: every expert runs on every token and the
outputs are combined with the top-k weights (zero for the experts a token did not choose).

    y_n = sum_j weights[n, j] * expert_{experts[n, j]}(x_n),  expert_e(x) = W_down_e(silu(x W_gate_e) * x W_up_e)
"""

import jax
import jax.numpy as jnp


def routed_output(x_NxD, experts_NxK, weights_NxK, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD):
    """float32 [N, D]; costs E times the active FLOPs (never a fast path)."""
    f32 = jnp.float32
    x_NxD = x_NxD.astype(f32)
    h_NxExF = (jax.nn.silu(jnp.einsum("nd,edf->nef", x_NxD, w_gate_ExDxF.astype(f32)))
               * jnp.einsum("nd,edf->nef", x_NxD, w_up_ExDxF.astype(f32)))
    y_NxExD = jnp.einsum("nef,efd->ned", h_NxExF, w_down_ExFxD.astype(f32))
    E = w_gate_ExDxF.shape[0]
    gate_NxE = jnp.sum(jax.nn.one_hot(experts_NxK, E, dtype=f32) * weights_NxK[..., None].astype(f32), axis=1)
    return jnp.einsum("ne,ned->nd", gate_NxE, y_NxExD)
