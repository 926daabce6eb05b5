"""The sLSTM cell, forward and backward, gate by gate: the pointwise part shared by the Pallas
kernels (tpu.py, tpu_backward.py, gpu.py, gpu_backward.py) and the padding/layout helpers of their
wrappers.

The math is xla.py's `cell` and `cell_backward` (the stabiliser-gradient rule included) written on
four separate [rows, D] gate arrays instead of a stacked [.., 4, D] one, so the kernels never slice
or stack along the lane axis (Mosaic: unaligned lane slices for D < 128; Triton: no stacking).
Everything is float32.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from hybrax.pallas_kernels.slstm.reference import normal

F32 = jnp.float32


def dot(x, y, mxu_dtype):
    """x @ y accumulated in float32: bfloat16 operands (one MXU / tensor-core pass) or float32 ones
    at full precision (TPU default and Triton default would round to bf16 passes / TF32)."""
    if jnp.dtype(mxu_dtype) == jnp.bfloat16:
        return jax.lax.dot_general(x.astype(jnp.bfloat16), y.astype(jnp.bfloat16), (((1,), (0,)), ((), ())),
                                   preferred_element_type=F32)
    return jax.lax.dot_general(x.astype(F32), y.astype(F32), (((1,), (0,)), ((), ())),
                               precision=jax.lax.Precision.HIGHEST, preferred_element_type=F32)


def cell(i_pre, f_pre, z_pre, o_pre, c, n, m):
    """One step from the gate pre-activations and the entering (c, n, m): (c, n, m, h)."""
    lf = jax.nn.log_sigmoid(f_pre)
    m_new = jnp.maximum(lf + m, i_pre)
    i_gate = jnp.exp(i_pre - m_new)
    f_gate = jnp.exp(lf + m - m_new)
    c_new = f_gate * c + i_gate * jnp.tanh(z_pre)
    n_new = f_gate * n + i_gate
    ok = normal(n_new)
    ratio = jnp.where(ok, c_new / jnp.where(ok, n_new, 1), 0)
    return c_new, n_new, m_new, jax.nn.sigmoid(o_pre) * ratio


def hidden(o_pre, c, n):
    """h = sigmoid(o~) c / n as the forward computes it (for dR's h_{t-1} in the wrappers)."""
    ok = normal(n)
    return jax.nn.sigmoid(o_pre) * jnp.where(ok, c / jnp.where(ok, n, 1), 0)


def cell_backward(pre, prev, new, dh, dc, dn, dm):
    """xla.cell_backward on gate lists: pre = (i~, f~, z~, o~), prev = entering (c, n, m), new = the
    (c, n, m) the step made; dh, dc, dn, dm the adjoints of the step's outputs (see xla.py's module
    docstring for the stabiliser rule). Returns ((d i~, d f~, d z~, d o~), (dc, dn, dm) entering)."""
    i_pre, f_pre, z_pre, o_pre = pre
    c_prev, n_prev, m_prev = prev
    c, n, m = new
    lf = jax.nn.log_sigmoid(f_pre)
    i_gate = jnp.exp(i_pre - m)
    f_gate = jnp.exp(lf + m_prev - m)
    tanh_z = jnp.tanh(z_pre)
    sig_o = jax.nn.sigmoid(o_pre)
    ok = normal(n)
    inv_n = jnp.where(ok, 1 / jnp.where(ok, n, 1), 0)
    ratio = jnp.where(ok, c / jnp.where(ok, n, 1), 0)
    dc = dc + dh * sig_o * inv_n
    dn = dn - dh * sig_o * ratio * inv_n
    d_o = dh * ratio * sig_o * (1 - sig_o)
    d_z = dc * i_gate * (1 - tanh_z * tanh_z)
    from_lf = lf + m_prev
    took_i = jnp.where(i_pre > from_lf, 1.0, jnp.where(i_pre == from_lf, 0.5, 0.0)).astype(F32)
    d_i = i_gate * (dc * tanh_z + dn) + dm * took_i
    d_lf = f_gate * (dc * c_prev + dn * n_prev) + dm * (1 - took_i)
    d_f = d_lf * jax.nn.sigmoid(-f_pre)
    return (d_i, d_f, d_z, d_o), (f_gate * dc, f_gate * dn, dm * (1 - took_i))


def mxu_dtype(gate_inputs, recurrent_weights):
    """bfloat16 MXU operands when both inputs are bfloat16, else float32."""
    low = gate_inputs.dtype == jnp.bfloat16 and recurrent_weights.dtype == jnp.bfloat16
    return "bfloat16" if low else "float32"


def refuse_unsupported(kernel, gate_inputs, recurrent_weights, initial_state):
    """NotImplementedError for float64 (x64) inputs: the kernels compute in float32."""
    dtypes = [gate_inputs.dtype, recurrent_weights.dtype] + [s.dtype for s in initial_state or ()]
    if any(jnp.dtype(d).itemsize > 4 for d in dtypes):
        raise NotImplementedError(f"{kernel} computes in float32; got dtypes {sorted({str(d) for d in dtypes})}")


def prepare(gate_inputs, recurrent_weights, initial_state, segment_ids, Tp, Bp, Dp):
    """Kernel layout, zero padded to (Tp, Bp, Dp): x [H, Tp, 4, Bp, Dp] (input dtype), R as
    [H, 4, Dp, Dp] (R4[h, g] = R[h, :, g, :]), s0 [H, 4, Bp, Dp] float32 (zeros if None), keep
    [Tp, Bp, 1] float32 (0 where a segment starts, else 1; None without segments)."""
    B, T, H, _, D = gate_inputs.shape
    x = jnp.transpose(gate_inputs, (2, 1, 3, 0, 4))
    x = jnp.pad(x, ((0, 0), (0, Tp - T), (0, 0), (0, Bp - B), (0, Dp - D)))
    R = jnp.transpose(recurrent_weights, (0, 2, 1, 3))
    R = jnp.pad(R, ((0, 0), (0, 0), (0, Dp - D), (0, Dp - D)))
    if initial_state is None:
        s0 = jnp.zeros((H, 4, Bp, Dp), F32)
    else:
        s0 = jnp.stack([jnp.swapaxes(s.astype(F32), 0, 1) for s in initial_state], axis=1)
        s0 = jnp.pad(s0, ((0, 0), (0, 0), (0, Bp - B), (0, Dp - D)))
    keep = None
    if segment_ids is not None:
        starts = jnp.concatenate([jnp.zeros((B, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
        keep = jnp.pad((~starts).T.astype(F32), ((0, Tp - T), (0, Bp - B)), constant_values=1.0)[:, :, None]
    return x, R, s0, keep


def finish(h, final, shape, dtype, return_final_state):
    """Back from the kernel layout: h [H, Tp, Bp, Dp] -> [B, T, H, D] in `dtype`; final [H, 4, Bp, Dp]
    -> (c, n, m, h) each [B, H, D] float32, or None."""
    B, T, H, _, D = shape
    h = jnp.transpose(h[:, :T, :B, :D], (2, 1, 0, 3)).astype(dtype)
    if not return_final_state:
        return h, None
    return h, tuple(jnp.swapaxes(final[:, g, :B, :D], 0, 1) for g in range(4))


def backward_outside(pre, states, s0, keep, d_pre, T):
    """The wrappers' part of the backward: h_{t-1} (recomputed from the saved pre-activations and
    states, as xla.py does) and dR = sum_t h_{t-1}^T d pre_t as one einsum over all (t, b):
    pre, d_pre [H, Tp, 4, Bp, Dp], states [H, Tp, 3, Bp, Dp] (c, n, m after each step), s0
    [H, 4, Bp, Dp]. Returns dR as [H, 4, Dp, Dp] (the kernel layout of R)."""
    h = hidden(pre[:, :, 3], states[:, :, 0], states[:, :, 1])  # [H, Tp, Bp, Dp]
    h_prev = jnp.concatenate([s0[:, None, 3], h[:, :-1]], axis=1)
    if keep is not None:
        h_prev = h_prev * keep[None]
    valid = (jnp.arange(h_prev.shape[1]) < T)[None, :, None, None]
    h_prev = jnp.where(valid, h_prev, 0)
    return jnp.einsum("htbd,htgbe->hgde", h_prev, d_pre, precision=jax.lax.Precision.HIGHEST)


def with_own_backward(forward: Callable, load_backward: Callable[[], Callable]) -> Callable:
    """The kernel call `(cfg, x, R4, s0, keep) -> (h, final)` on kernel-layout arrays (`prepare`) as a
    `jax.custom_vjp` whose backward is the backward kernel, not autodiff through the forward.

    `forward(cfg, x, R4, s0, keep, save)` returns (h, final) and, with save, the residuals (pre,
    states). `load_backward()` returns `backward(cfg, pre, states, s0, keep, dh, d_final, Rt4) ->
    (d pre, d initial state)`, imported at the first backward (it imports the forward's module).
    Here, around it, the stabiliser rule of xla.py: the final m's own adjoint dm_T - c_T dc_T -
    n_T dn_T enters the kernel, and dm_0 += c_0 dc_0 + n_0 dn_0 (m_0 also scales f'_1 directly);
    and dR as one matmul (`backward_outside`). `cfg` must have fields T and x_dtype."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def fused(cfg, x, R4, s0, keep):
        return tuple(forward(cfg, x, R4, s0, keep, save=False))

    def fused_fwd(cfg, x, R4, s0, keep):
        h, final, pre, states = forward(cfg, x, R4, s0, keep, save=True)
        return (h, final), (R4, s0, keep, pre, states, final)

    def fused_bwd(cfg, residuals, cotangents):
        R4, s0, keep, pre, states, final = residuals
        dh, d_final = cotangents
        dm_last = d_final[:, 2] - final[:, 0] * d_final[:, 0] - final[:, 1] * d_final[:, 1]
        d_final = d_final.at[:, 2].set(dm_last)
        d_pre, d_init = load_backward()(cfg, pre, states, s0, keep, dh, d_final, jnp.swapaxes(R4, 2, 3))
        dR4 = backward_outside(pre, states, s0, keep, d_pre, cfg.T)
        d_init = d_init.at[:, 2].add(s0[:, 0] * d_init[:, 0] + s0[:, 1] * d_init[:, 1])
        return d_pre.astype(cfg.x_dtype), dR4.astype(R4.dtype), d_init, None

    fused.defvjp(fused_fwd, fused_bwd)
    return fused
