"""The sLSTM recurrence by definition: a `lax.scan` over time, gate by gate. The oracle, never
the fast path.

    (i~, f~, z~, o~)_t = gate_inputs_t + h_{t-1} R          (per head: [D] @ [D, 4, D])
    lf_t = log_sigmoid(f~_t)
    m_t  = max(lf_t + m_{t-1}, i~_t)                         (the stabiliser)
    i'_t = exp(i~_t - m_t),   f'_t = exp(lf_t + m_{t-1} - m_t)
    c_t  = f'_t c_{t-1} + i'_t tanh(z~_t)
    n_t  = f'_t n_{t-1} + i'_t
    h_t  = sigmoid(o~_t) c_t / n_t

(Beck et al. 2024, "xLSTM: Extended Long Short-Term Memory", sLSTM; heads with block-diagonal
recurrent weights as in FlashRNN, Pöppel et al. 2024.) gate_inputs [B, T, H, 4, D] in the gate
order (i, f, z, o), recurrent_weights R [H, D, 4, D], state (c, n, m, h) each [B, H, D], zeros
unless given; the state entering a step where a new segment starts is zeros (all four).

Arithmetic runs in float32, or float64 when the inputs are float64 (under `jax.enable_x64`, the
tests' ground truth); the final state comes back in that dtype, h in gate_inputs' dtype.
Gradients are autodiff of this scan, the stabiliser included.

Division: after a step n_t > 0. Either m_t = i~_t, so i'_t = 1 and n_t >= 1, or m_t = lf_t +
m_{t-1}, so f'_t = 1 and n_t >= n_{t-1}; from a zero state (the start, or a segment start) the
first step gives n >= exp(min(i~, 0)) since lf <= 0 and m_0 = 0. So n_t = 0 (and then c_t = 0, a
0/0) only where exp(i~ - m) underflows at such a first step: i~ below about -87 in float32 (-708
in float64), or a given initial state with n_0 = 0 and a large m_0. There `safe_ratio` gives h = 0
(the true value is sigmoid(o~) tanh(z~)) with a zero gradient through the division; every value
with n_t a normal number is unchanged.
"""

import jax
import jax.numpy as jnp

PRECISION = jax.lax.Precision.HIGHEST


def normal(n):
    """Where |n| is at least the smallest normal number of its dtype: elsewhere n underflowed (see
    the module docstring), and 1 / n would overflow."""
    return jnp.abs(n) >= jnp.finfo(n.dtype).tiny


def safe_ratio(c, n):
    """c / n, and 0 with a zero gradient where n underflowed (`normal`); the double `where` keeps
    the unused branch's gradient finite. Every other value is unchanged."""
    ok = normal(n)
    return jnp.where(ok, c / jnp.where(ok, n, 1), 0)


def slstm(gate_inputs, recurrent_weights, *, initial_state, segment_ids, return_final_state):
    B, T, H, _, D = gate_inputs.shape
    dtype = jnp.result_type(gate_inputs.dtype, recurrent_weights.dtype, jnp.float32)
    if initial_state is not None:
        dtype = jnp.result_type(dtype, *(s.dtype for s in initial_state))
    x_TxBxHx4xD = jnp.moveaxis(gate_inputs, 1, 0).astype(dtype)
    R_HxDx4xD = recurrent_weights.astype(dtype)
    if segment_ids is None:
        reset_TxB = jnp.zeros((T, B), bool)
    else:
        starts_BxT = jnp.concatenate(
            [jnp.zeros((B, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
        reset_TxB = starts_BxT.T
    zeros = jnp.zeros((B, H, D), dtype)
    state = ((zeros,) * 4 if initial_state is None
             else tuple(s.astype(dtype) for s in initial_state))

    def step(state, inputs):
        x_BxHx4xD, reset_B = inputs
        c, n, m, h = (jnp.where(reset_B[:, None, None], jnp.zeros_like(s), s) for s in state)

        def pre(g):  # gate g's pre-activation [B, H, D]
            return x_BxHx4xD[:, :, g] + jnp.einsum("bhd,hde->bhe", h, R_HxDx4xD[:, :, g], precision=PRECISION)

        i_pre, f_pre, z_pre, o_pre = pre(0), pre(1), pre(2), pre(3)
        lf = jax.nn.log_sigmoid(f_pre)
        m_new = jnp.maximum(lf + m, i_pre)
        i_gate = jnp.exp(i_pre - m_new)
        f_gate = jnp.exp(lf + m - m_new)
        c_new = f_gate * c + i_gate * jnp.tanh(z_pre)
        n_new = f_gate * n + i_gate
        h_new = jax.nn.sigmoid(o_pre) * safe_ratio(c_new, n_new)
        return (c_new, n_new, m_new, h_new), h_new

    final, h_TxBxHxD = jax.lax.scan(step, state, (x_TxBxHx4xD, reset_TxB))
    h_BxTxHxD = jnp.moveaxis(h_TxBxHxD, 0, 1).astype(gate_inputs.dtype)
    return h_BxTxHxD, (final if return_final_state else None)
