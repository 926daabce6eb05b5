"""The gated delta rule by definition: a `lax.scan` over time. The oracle, never the fast path.

    S_0 = initial_state or 0
    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t^T v_t   (S_{t-1} := 0 where a new segment starts)
        = a S_{t-1} + beta_t k_t^T (v_t - a k_t S_{t-1}),   a = exp(g_t)
    o_t = scale * q_t S_t

q, k [B, T, H, K], v [B, T, H, V], beta [B, T, H], g = log_decay None (0) / [B, T, H], state
[B, H, K, V] (the paper's [V, K] state transposed, as in linear_attention). DeltaNet is Schlag et
al. 2021 / Yang et al. 2024; the gate exp(g_t) is Gated DeltaNet (Yang, Kautz & Hatamizadeh 2024).

Arithmetic runs in float32, or float64 when the inputs are float64 (under `jax.enable_x64`, the
tests' ground truth); the final state comes back in that dtype, the output in v's dtype.
"""

import jax
import jax.numpy as jnp


def delta_rule(q, k, v, beta, log_decay, *, scale, initial_state, segment_ids, return_final_state,
               chunk_size):
    del chunk_size  # the definition has no chunks
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype, beta.dtype, jnp.float32)
    for x in (log_decay, initial_state):
        if x is not None:
            dtype = jnp.result_type(dtype, x.dtype)
    # Time-major inputs for the scan.
    q_TxBxHxK = jnp.moveaxis(q, 1, 0).astype(dtype)
    k_TxBxHxK = jnp.moveaxis(k, 1, 0).astype(dtype)
    v_TxBxHxV = jnp.moveaxis(v, 1, 0).astype(dtype)
    beta_TxBxH = jnp.moveaxis(beta, 1, 0).astype(dtype)
    g_TxBxH = (jnp.zeros((T, B, H), dtype) if log_decay is None
               else jnp.moveaxis(log_decay, 1, 0).astype(dtype))
    if segment_ids is None:
        reset_TxB = jnp.zeros((T, B), bool)
    else:
        starts_BxT = jnp.concatenate(
            [jnp.zeros((B, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
        reset_TxB = starts_BxT.T
    state_BxHxKxV = (jnp.zeros((B, H, K, V), dtype) if initial_state is None
                     else initial_state.astype(dtype))

    def step(state_BxHxKxV, inputs):
        q_BxHxK, k_BxHxK, v_BxHxV, beta_BxH, g_BxH, reset_B = inputs
        decayed = jnp.exp(g_BxH)[..., None, None] * state_BxHxKxV
        decayed = jnp.where(reset_B[:, None, None, None], jnp.zeros_like(decayed), decayed)
        # The delta: what the memory should return for k_t minus what it returns now.
        delta_BxHxV = v_BxHxV - jnp.einsum("bhk,bhkv->bhv", k_BxHxK, decayed)
        state_BxHxKxV = decayed + beta_BxH[..., None, None] * k_BxHxK[..., :, None] * delta_BxHxV[..., None, :]
        o_BxHxV = scale * jnp.einsum("bhk,bhkv->bhv", q_BxHxK, state_BxHxKxV)
        return state_BxHxKxV, o_BxHxV

    final_BxHxKxV, o_TxBxHxV = jax.lax.scan(
        step, state_BxHxKxV, (q_TxBxHxK, k_TxBxHxK, v_TxBxHxV, beta_TxBxH, g_TxBxH, reset_TxB))
    o_BxTxHxV = jnp.moveaxis(o_TxBxHxV, 0, 1).astype(v.dtype)
    return o_BxTxHxV, (final_BxHxKxV if return_final_state else None)
