"""Linear attention with decay by definition: a `lax.scan` over time. The oracle, never the fast path.

    S_0 = initial_state or 0
    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t          (S_{t-1} := 0 where a new segment starts)
    o_t = scale * q_t S_t

q, k [B, T, H, K], v [B, T, H, V], g = log_decay None / [B, T, H] / [B, T, H, K], state
[B, H, K, V]. Plain linear attention is Katharopoulos et al. 2020; scalar decay covers RetNet,
Lightning Attention and Mamba-2 SSD; per-channel gates are GLA (Yang et al. 2023).

Arithmetic runs in float32, or float64 when the inputs are float64 (under `jax.enable_x64`, the
tests' ground truth); the final state comes back in that dtype, the output in v's dtype.
"""

import jax
import jax.numpy as jnp


def linear_attention(q, k, v, log_decay, *, scale, initial_state, segment_ids, return_final_state,
                     chunk_size):
    del chunk_size  # the definition has no chunks
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype, jnp.float32)
    if log_decay is not None:
        dtype = jnp.result_type(dtype, log_decay.dtype)
    if initial_state is not None:
        dtype = jnp.result_type(dtype, initial_state.dtype)
    # Time-major inputs for the scan.
    q_TxBxHxK = jnp.moveaxis(q, 1, 0).astype(dtype)
    k_TxBxHxK = jnp.moveaxis(k, 1, 0).astype(dtype)
    v_TxBxHxV = jnp.moveaxis(v, 1, 0).astype(dtype)
    if log_decay is None:
        g_TxBxHxK = jnp.zeros((T, B, H, K), dtype)
    elif log_decay.ndim == 3:
        g_TxBxHxK = jnp.broadcast_to(jnp.moveaxis(log_decay, 1, 0)[..., None].astype(dtype), (T, B, H, K))
    else:
        g_TxBxHxK = jnp.moveaxis(log_decay, 1, 0).astype(dtype)
    if segment_ids is None:
        reset_TxB = jnp.zeros((T, B), bool)
    else:
        starts_BxT = jnp.concatenate(
            [jnp.zeros((B, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
        reset_TxB = starts_BxT.T
    state_BxHxKxV = (jnp.zeros((B, H, K, V), dtype) if initial_state is None
                     else initial_state.astype(dtype))

    def step(state_BxHxKxV, inputs):
        q_BxHxK, k_BxHxK, v_BxHxV, g_BxHxK, reset_B = inputs
        decayed = jnp.exp(g_BxHxK)[..., None] * state_BxHxKxV
        decayed = jnp.where(reset_B[:, None, None, None], jnp.zeros_like(decayed), decayed)
        state_BxHxKxV = decayed + k_BxHxK[..., :, None] * v_BxHxV[..., None, :]
        o_BxHxV = scale * jnp.einsum("bhk,bhkv->bhv", q_BxHxK, state_BxHxKxV)
        return state_BxHxKxV, o_BxHxV

    final_BxHxKxV, o_TxBxHxV = jax.lax.scan(
        step, state_BxHxKxV, (q_TxBxHxK, k_TxBxHxK, v_TxBxHxV, g_TxBxHxK, reset_TxB))
    o_BxTxHxV = jnp.moveaxis(o_TxBxHxV, 0, 1).astype(v.dtype)
    return o_BxTxHxV, (final_BxHxKxV if return_final_state else None)
