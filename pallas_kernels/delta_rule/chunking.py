"""Layout glue shared by the Pallas delta-rule kernels (tpu.py, gpu.py).

The kernels see one head at a time in [B, H, Tp, D] layout (Tp: time padded to a multiple of the
chunk), with linear_attention's helpers (`linear_attention/chunking.py`): the within-chunk
cumulative log decay b (its cumsum is plain jnp outside the kernels, differentiated by JAX), the
segment reset counts and in / out flags. beta travels as float32 (its cast back to the input dtype
is differentiated by JAX too). Padded tokens have q = k = v = 0, beta = 0 and g = 0: their corrected
value X is 0, so they change neither the outputs of real tokens nor the state.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from hybrax.pallas_kernels.linear_attention.chunking import Layout, make_layout, to_heads

__all__ = ["Layout", "make_layout", "beta_heads", "with_own_backward"]


def beta_heads(beta_BxTxH, layout: Layout):
    """beta [B, T, H] -> [B, H, Tp, 1] float32, zero padded."""
    return to_heads(beta_BxTxH.astype(jnp.float32)[..., None], layout)


def with_own_backward(forward: Callable, load_backward: Callable[[], Callable]) -> Callable:
    """The kernel call `(config, q, k, v, beta, b, s0, seg) -> (o, final)` as a `jax.custom_vjp`
    whose backward runs the backward kernel. `forward(..., save_states)` also returns the state
    entering every chunk when save_states; `load_backward()` returns
    `backward(config, q, k, v, beta, b, seg, states, d_o, d_final) -> (dq, dk, dv, dbeta, db, ds0)`
    (imported at the first backward: the backward module imports the forward's)."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def chunked(config, q, k, v, beta, b, s0, seg):
        return tuple(forward(config, q, k, v, beta, b, s0, seg, save_states=False))

    def chunked_fwd(config, q, k, v, beta, b, s0, seg):
        o, final, states = forward(config, q, k, v, beta, b, s0, seg, save_states=True)
        return (o, final), (q, k, v, beta, b, s0, seg, states)

    def chunked_bwd(config, residuals, cotangents):
        q, k, v, beta, b, s0, seg, states = residuals
        dq, dk, dv, dbeta, db, ds0 = load_backward()(config, q, k, v, beta, b, seg, states, *cotangents)
        return (dq, dk, dv, dbeta, db if b is not None else None, ds0 if s0 is not None else None,
                tuple(None for _ in seg))

    chunked.defvjp(chunked_fwd, chunked_bwd)
    return chunked
