"""The mLSTM cell by definition: a `lax.scan` over time. The oracle, never the fast path.

    m_t = max(lf_t + m_{t-1}, li_t)
    C_t = exp(lf_t + m_{t-1} - m_t) C_{t-1} + exp(li_t - m_t) k_t^T v_t
    n_t = exp(lf_t + m_{t-1} - m_t) n_{t-1} + exp(li_t - m_t) k_t
    h_t = (scale q_t C_t) / max(|scale q_t . n_t|, exp(-m_t))

(C_0, n_0, m_0) = initial_state or (0, 0, 0), and the state entering a step where a new segment
starts is (0, 0, 0) too. q, k [B, T, H, K], v [B, T, H, V], li = log_input_gate and lf =
log_forget_gate [B, T, H], state (C [B, H, K, V], n [B, H, K], m [B, H]). This is xLSTM's
stabilised mLSTM (Beck et al. 2024, "xLSTM: Extended Long Short-Term Memory", section 2.3; xLSTM
7B, Beck et al. 2025).

At a tie in the max the gradient goes to li_t, the newer term (jnp.maximum would split it): m is
not differentiable there, and this is the subgradient the chunked implementations also pick, so
exact ties (lf = 0, equal input gates) compare equal.

Arithmetic runs in float32, or float64 when the inputs are float64 (under `jax.enable_x64`, the
tests' ground truth); the final state comes back in that dtype, the output in v's dtype.
"""

import jax
import jax.numpy as jnp

PRECISION = jax.lax.Precision.HIGHEST  # so the oracle stays float32 on TPU/GPU too


def mlstm(q, k, v, log_input_gate, log_forget_gate, *, scale, initial_state, segment_ids,
          return_final_state, chunk_size):
    del chunk_size  # the definition has no chunks
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtypes = [q.dtype, k.dtype, v.dtype, log_input_gate.dtype, log_forget_gate.dtype, jnp.float32]
    if initial_state is not None:
        dtypes += [x.dtype for x in initial_state]
    dtype = jnp.result_type(*dtypes)
    time_major = lambda x: jnp.moveaxis(x, 1, 0).astype(dtype)
    inputs = tuple(time_major(x) for x in (q, k, v, log_input_gate, log_forget_gate))
    if segment_ids is None:
        reset_TxB = jnp.zeros((T, B), bool)
    else:
        starts_BxT = jnp.concatenate(
            [jnp.zeros((B, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
        reset_TxB = starts_BxT.T
    if initial_state is None:
        state = (jnp.zeros((B, H, K, V), dtype), jnp.zeros((B, H, K), dtype), jnp.zeros((B, H), dtype))
    else:
        state = tuple(x.astype(dtype) for x in initial_state)

    def step(state, inputs):
        c_BxHxKxV, n_BxHxK, m_BxH = state
        q_BxHxK, k_BxHxK, v_BxHxV, li_BxH, lf_BxH, reset_B = inputs
        # A new segment starts from the zero state, exactly as a fresh sequence does.
        c_BxHxKxV = jnp.where(reset_B[:, None, None, None], 0.0, c_BxHxKxV)
        n_BxHxK = jnp.where(reset_B[:, None, None], 0.0, n_BxHxK)
        m_BxH = jnp.where(reset_B[:, None], 0.0, m_BxH)
        carried_BxH = lf_BxH + m_BxH
        m_BxH = jnp.where(li_BxH >= carried_BxH, li_BxH, carried_BxH)  # the max; a tie goes to li
        forget_BxH = jnp.exp(carried_BxH - m_BxH)
        input_BxH = jnp.exp(li_BxH - m_BxH)
        c_BxHxKxV = (forget_BxH[..., None, None] * c_BxHxKxV
                     + input_BxH[..., None, None] * k_BxHxK[..., :, None] * v_BxHxV[..., None, :])
        n_BxHxK = forget_BxH[..., None] * n_BxHxK + input_BxH[..., None] * k_BxHxK
        num_BxHxV = scale * jnp.einsum("bhk,bhkv->bhv", q_BxHxK, c_BxHxKxV, precision=PRECISION)
        den_BxH = scale * jnp.einsum("bhk,bhk->bh", q_BxHxK, n_BxHxK, precision=PRECISION)
        floor_BxH = jnp.maximum(jnp.abs(den_BxH), jnp.exp(-m_BxH))
        # exp(-m) underflows for m > ~100 (float32); with q = 0 that is 0 / 0, whose value is 0.
        floor_BxH = jnp.where(floor_BxH > 0, floor_BxH, 1.0)
        h_BxHxV = num_BxHxV / floor_BxH[..., None]
        return (c_BxHxKxV, n_BxHxK, m_BxH), h_BxHxV

    final, h_TxBxHxV = jax.lax.scan(step, state, inputs + (reset_TxB,))
    h_BxTxHxV = jnp.moveaxis(h_TxBxHxV, 0, 1).astype(v.dtype)
    return h_BxTxHxV, (final if return_final_state else None)
