"""The sLSTM recurrence in jnp with its own backward: the CPU path and the fallback everywhere.

    (i~, f~, z~, o~)_t = gate_inputs_t + h_{t-1} R          (per head: [D] @ [D, 4, D])
    lf_t = log_sigmoid(f~_t),   m_t = max(lf_t + m_{t-1}, i~_t)
    i'_t = exp(i~_t - m_t),     f'_t = exp(lf_t + m_{t-1} - m_t)
    c_t  = f'_t c_{t-1} + i'_t tanh(z~_t),   n_t = f'_t n_{t-1} + i'_t,   h_t = sigmoid(o~_t) c_t / n_t

gate_inputs [B, T, H, 4, D] (gates i, f, z, o), R [H, D, 4, D], state (c, n, m, h) [B, H, D].

Forward: a `lax.scan` whose step is one fused recurrent matmul h_{t-1} [H, B, D] x R [H, D, 4D]
(Precision.HIGHEST) followed by the pointwise cell. Inside, arrays are time- and head-major ([T, H,
B, ...]) so the heads are the matmul's leading batch dimension: with heads second (bhd,hdk->bhk)
XLA's CPU dot was 3 to 5 times slower per step. Under differentiation the forward saves per step
only the gate pre-activations [T, H, B, 4, D] and (c, n, m) [T, H, B, D]; h is recomputed pointwise.

Backward (`jax.custom_vjp`, the algorithm a fused FlashRNN-style kernel implements): a reverse
`lax.scan` carrying the adjoints (dc, dn, dm, dh) of the state; each step runs `cell_backward`
and one matmul d(pre_t) R^T -> dh_{t-1}. d(gate_inputs_t) = d(pre_t). dR = sum_t h_{t-1}^T d(pre_t)
is one einsum over all [T, B] after the scan, so R stays read-only inside the loop. The h_{t-1}
and the entering (c, n, m) of every step are formed from the saved states before the scan.

The stabiliser in the backward. m_t only rescales: (c, n, m) and (c e^d, n e^d, m - d) give the
same h forever after, so the adjoint of m_t (with all of its uses: i'_t, f'_t, f'_{t+1}, m_{t+1})
is zero for every loss on h. Written out, the uses through c_t, n_t and f'_{t+1} cancel exactly,
leaving

    dm_T = (cotangent of the final m) - c_T dc_T - n_T dn_T     (dc_T, dn_T: final-state cotangents)
    dm_{t-1} = dm_t [m_t took the branch lf_t + m_{t-1}]          (0 across a segment start)

so the cell backward uses i', f' with m held fixed (as the xLSTM kernels do) and adds dm_t to
d i~_t or d lf_t, whichever branch the max took (half each at a tie, as jnp.maximum's derivative).
dm is zero unless the loss reads the final c, n or m; then this max path is its exact gradient.
The initial m gets dm_0 = c_0 dc_0 + n_0 dn_0 + dm_0(max path): m_0 also scales f'_1 directly.
"""

import jax
import jax.numpy as jnp

from hybrax.pallas_kernels.slstm.reference import normal, safe_ratio

PRECISION = jax.lax.Precision.HIGHEST  # float32 matmuls; TPU/GPU defaults would round to bf16/tf32
# Scan unroll (both scans). On a 2-core CPU (B=8, H=4, D=64, T=2048, forward + backward) unroll
# 1 / 2 / 4 / 8 gave 41k / 32k / 23k / 12k tokens/s: unrolling slows XLA CPU's backward loop, and
# the forward alone was flat (160k / 159k / 152k / 150k). Worth measuring again on GPU/TPU.
UNROLL = 1


def _einsum(spec, *operands):
    return jnp.einsum(spec, *operands, precision=PRECISION)


def _recurrent(h_HxBxD, R_HxDx4D):
    """h_{t-1} R for all four gates in one matmul: [H, B, D] x [H, D, 4D] -> [H, B, 4, D]."""
    out = _einsum("hbd,hdk->hbk", h_HxBxD, R_HxDx4D)
    return out.reshape(out.shape[:2] + (4, h_HxBxD.shape[-1]))


def cell(pre_HxBx4xD, c, n, m):
    """One sLSTM step from the gate pre-activations and the entering (c, n, m): (c, n, m, h)."""
    i_pre, f_pre, z_pre, o_pre = (pre_HxBx4xD[:, :, g] for g in range(4))
    lf = jax.nn.log_sigmoid(f_pre)
    m_new = jnp.maximum(lf + m, i_pre)
    i_gate = jnp.exp(i_pre - m_new)
    f_gate = jnp.exp(lf + m - m_new)
    c_new = f_gate * c + i_gate * jnp.tanh(z_pre)
    n_new = f_gate * n + i_gate
    return c_new, n_new, m_new, jax.nn.sigmoid(o_pre) * safe_ratio(c_new, n_new)


def cell_backward(pre_HxBx4xD, c_prev, n_prev, m_prev, c, n, m, dh, dc, dn, dm):
    """Adjoints through one step. In: the step's pre-activations, the entering state (c, n, m)_prev,
    the state it made (c, n, m), and the adjoints of its outputs: dh (from the output and from
    d pre_{t+1} R^T), dc, dn (carried back from step t + 1 through f'_{t+1}) and dm (the max path).
    Out: d pre [H, B, 4, D] and the adjoints (dc, dn, dm) of the entering state, excluding the
    entering h (that is d pre R^T) and excluding m_prev's direct use in f'_t (see the module
    docstring: it cancels, and the caller adds it back for the initial m only).

        dc += dh sigmoid(o~) / n,     dn -= dh sigmoid(o~) (c / n) / n
        d o~ = dh (c / n) sigmoid'(o~),          d z~ = dc i' tanh'(z~)
        d i~ = i' (dc tanh(z~) + dn) + dm [m took i~]
        d lf = f' (dc c_prev + dn n_prev) + dm [m took lf + m_prev],   d f~ = d lf sigmoid(-f~)
        (dc, dn, dm)_prev = (f' dc, f' dn, dm [m took lf + m_prev])
    """
    i_pre, f_pre, z_pre, o_pre = (pre_HxBx4xD[:, :, g] for g in range(4))
    lf = jax.nn.log_sigmoid(f_pre)
    i_gate = jnp.exp(i_pre - m)  # the forward's i', f': m held fixed
    f_gate = jnp.exp(lf + m_prev - m)
    tanh_z = jnp.tanh(z_pre)
    sig_o = jax.nn.sigmoid(o_pre)
    ratio = safe_ratio(c, n)  # c / n, |c / n| <= 1 for reachable states
    ok = normal(n)  # else n underflowed: h = 0 there, with a zero gradient (reference.safe_ratio)
    inv_n = jnp.where(ok, 1 / jnp.where(ok, n, 1), 0)
    dc = dc + dh * sig_o * inv_n
    dn = dn - dh * sig_o * ratio * inv_n  # (c / n) / n: c / n^2 would underflow for n < 1e-19
    d_o = dh * ratio * sig_o * (1 - sig_o)
    d_z = dc * i_gate * (1 - tanh_z * tanh_z)
    from_lf = lf + m_prev
    took_i = jnp.where(i_pre > from_lf, 1.0, jnp.where(i_pre == from_lf, 0.5, 0.0)).astype(dm.dtype)
    d_i = i_gate * (dc * tanh_z + dn) + dm * took_i
    d_lf = f_gate * (dc * c_prev + dn * n_prev) + dm * (1 - took_i)
    d_f = d_lf * jax.nn.sigmoid(-f_pre)
    d_pre = jnp.stack([d_i, d_f, d_z, d_o], axis=2)
    return d_pre, (f_gate * dc, f_gate * dn, dm * (1 - took_i))


def _entering(state, reset_B):
    """The state [H, B, D] entering a step: zeros (all four parts) where a new segment starts."""
    keep = ~reset_B[None, :, None]
    return tuple(jnp.where(keep, s, jnp.zeros_like(s)) for s in state)


def _forward(x_TxHxBx4xD, R_HxDx4xD, state0, reset_TxB, save):
    H, D = R_HxDx4xD.shape[:2]
    R_HxDx4D = R_HxDx4xD.reshape(H, D, 4 * D)

    def step(state, inputs):
        x_HxBx4xD, reset_B = inputs
        c, n, m, h = _entering(state, reset_B)
        pre = x_HxBx4xD + _recurrent(h, R_HxDx4D)
        new = cell(pre, c, n, m)
        return new, ((new[3], pre, new[0], new[1], new[2]) if save else new[3])

    return jax.lax.scan(step, state0, (x_TxHxBx4xD, reset_TxB), unroll=UNROLL)


@jax.custom_vjp
def _scan(x_TxHxBx4xD, R_HxDx4xD, state0, reset_TxB):
    """(h [T, H, B, D], final state (c, n, m, h) each [H, B, D]) from time- and head-major inputs
    in the compute dtype."""
    final, h_TxHxBxD = _forward(x_TxHxBx4xD, R_HxDx4xD, state0, reset_TxB, save=False)
    return h_TxHxBxD, final


def _scan_fwd(x_TxHxBx4xD, R_HxDx4xD, state0, reset_TxB):
    final, (h_TxHxBxD, pre, c, n, m) = _forward(x_TxHxBx4xD, R_HxDx4xD, state0, reset_TxB, save=True)
    return (h_TxHxBxD, final), (pre, c, n, m, R_HxDx4xD, state0, reset_TxB)


def _scan_bwd(residuals, cotangents):
    pre, c, n, m, R_HxDx4xD, state0, reset_TxB = residuals
    dh_TxHxBxD, (dc_final, dn_final, dm_final, dh_final) = cotangents
    h = jax.nn.sigmoid(pre[:, :, :, 3]) * safe_ratio(c, n)  # as in the forward
    # The state entering each step: the previous step's (the initial state at t = 0), zeroed at
    # segment starts.
    before = lambda s0, s: jnp.concatenate([s0[None], s[:-1]], axis=0)
    keep_Tx1xBx1 = ~reset_TxB[:, None, :, None]
    c_prev, n_prev, m_prev, h_prev = (jnp.where(keep_Tx1xBx1, before(s0, s), 0)
                                      for s0, s in zip(state0, (c, n, m, h)))
    dh_TxHxBxD = dh_TxHxBxD.at[-1].add(dh_final)
    H, D = R_HxDx4xD.shape[:2]
    # R^T as [H, 4D, D]: the per-step matmul then contracts lhs's last with rhs's middle axis.
    Rt_Hx4DxD = jnp.swapaxes(R_HxDx4xD.reshape(H, D, 4 * D), 1, 2)
    dm_last = dm_final - c[-1] * dc_final - n[-1] * dn_final  # the final m's own (max path) adjoint

    def step(carry, inputs):
        dc, dn, dm, dh_next = carry
        pre_t, c_p, n_p, m_p, c_t, n_t, m_t, dh_t, reset_B = inputs
        d_pre, (dc, dn, dm) = cell_backward(pre_t, c_p, n_p, m_p, c_t, n_t, m_t, dh_t + dh_next, dc, dn, dm)
        dh_prev = _einsum("hbk,hkd->hbd", d_pre.reshape(d_pre.shape[:2] + (4 * D,)), Rt_Hx4DxD)
        return _entering((dc, dn, dm, dh_prev), reset_B), d_pre

    carry = (dc_final, dn_final, dm_last, jnp.zeros_like(dh_final))
    (dc0, dn0, dm0, dh0), d_pre = jax.lax.scan(
        step, carry, (pre, c_prev, n_prev, m_prev, c, n, m, dh_TxHxBxD, reset_TxB),
        reverse=True, unroll=UNROLL)
    dR = _einsum("thbd,thbgk->hdgk", h_prev, d_pre)
    c0, n0 = state0[0], state0[1]
    dm0 = dm0 + c0 * dc0 + n0 * dn0  # m_0 also scales f'_1 directly (cancelled for computed m)
    return d_pre, dR, (dc0, dn0, dm0, dh0), None


_scan.defvjp(_scan_fwd, _scan_bwd)


def slstm(gate_inputs, recurrent_weights, *, initial_state, segment_ids, return_final_state):
    B, T, H, _, D = gate_inputs.shape
    dtype = jnp.result_type(gate_inputs.dtype, recurrent_weights.dtype, jnp.float32)
    if initial_state is not None:
        dtype = jnp.result_type(dtype, *(s.dtype for s in initial_state))
    if segment_ids is None:
        reset_TxB = jnp.zeros((T, B), bool)
    else:
        starts_BxT = jnp.concatenate(
            [jnp.zeros((B, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
        reset_TxB = starts_BxT.T
    state0 = ((jnp.zeros((H, B, D), dtype),) * 4 if initial_state is None
              else tuple(jnp.swapaxes(s, 0, 1).astype(dtype) for s in initial_state))
    x_TxHxBx4xD = jnp.transpose(gate_inputs, (1, 2, 0, 3, 4)).astype(dtype)
    h_TxHxBxD, final = _scan(x_TxHxBx4xD, recurrent_weights.astype(dtype), state0, reset_TxB)
    h_BxTxHxD = jnp.transpose(h_TxHxBxD, (2, 0, 1, 3)).astype(gate_inputs.dtype)
    final = tuple(jnp.swapaxes(s, 0, 1) for s in final)
    return h_BxTxHxD, (final if return_final_state else None)
