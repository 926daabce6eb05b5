"""Backward Pallas GPU (Triton) kernel of the sLSTM recurrence (forward: gpu.py): xla.py's reverse
scan in one kernel.

Grid (H, batch blocks); each program walks t = T - 1 .. 0 in a `fori_loop` carrying the adjoints
(dc, dn, dm, dh_next) [Bb, D] float32 in registers. Per step, from the forward's residuals:

    d pre_t, (dc, dn, dm) = cell_backward(pre_t, entering state, state_t, dh_t + dh_next, dc, dn, dm)
    dh_next = sum_g d pre_t,g R_g^T

and the carry is zeroed where a segment starts. The entering (c, n, m) is the saved state of step
t - 1, or the initial state at t = 0. dR = sum_t h_{t-1}^T d pre_t is one matmul after the kernel
(kernel_cell.backward_outside), as on TPU; the stabiliser rule is applied around the kernel
(kernel_cell.with_own_backward).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from hybrax.pallas_kernels.slstm.gpu import Config, compiler_params
from hybrax.pallas_kernels.slstm.kernel_cell import F32, cell_backward, dot


def _backward_kernel(cfg: Config, names, *refs):
    refs = dict(zip(names, refs))
    head, block = pl.program_id(0), pl.program_id(1)  # read outside the loop (interpret mode)
    rows = pl.ds(block * cfg.batch_block, cfg.batch_block)
    initial = [refs["s0"][head, g, rows, :] for g in range(3)]
    carry0 = tuple(refs["d_final"][head, g, rows, :] for g in range(4))

    def step(j, carry):
        t = cfg.T - 1 - j
        dc, dn, dm, dh_next = carry
        before = jnp.maximum(t - 1, 0)
        prev = [jnp.where(t > 0, refs["states"][head, before, g, rows, :], initial[g]) for g in range(3)]
        keep = None
        if cfg.segments:
            keep = refs["keep"][t, rows, :] > 0  # [Bb, 1]
            prev = [jnp.where(keep, p, 0.0) for p in prev]
        pre = [refs["pre"][head, t, g, rows, :] for g in range(4)]
        new = [refs["states"][head, t, g, rows, :] for g in range(3)]
        dh = refs["dh"][head, t, rows, :].astype(F32) + dh_next
        d_pre, (dc, dn, dm) = cell_backward(pre, prev, new, dh, dc, dn, dm)
        for g in range(4):
            refs["d_pre"][head, t, g, rows, :] = d_pre[g]
        dh_prev = dot(d_pre[0], refs["Rt"][head, 0, :, :], cfg.mxu_dtype)
        for g in range(1, 4):
            dh_prev = dh_prev + dot(d_pre[g], refs["Rt"][head, g, :, :], cfg.mxu_dtype)
        carry = (dc, dn, dm, dh_prev)
        if keep is not None:
            carry = tuple(jnp.where(keep, v, 0.0) for v in carry)
        return carry

    d_init = lax.fori_loop(0, cfg.T, step, carry0)
    for g in range(4):
        refs["d_init"][head, g, rows, :] = d_init[g]


def backward(cfg: Config, pre, states, s0, keep, dh, d_final, Rt4):
    """Kernel-level backward: residuals pre [H, T, 4, Bp, D], states [H, T, 3, Bp, D], s0 and d_final
    (dc, dn, dm_last, dh) [H, 4, Bp, D], Rt4 [H, 4, D, D] (R_g^T), dh [H, T, Bp, D]
    -> (d pre [H, T, 4, Bp, D] float32, d initial state [H, 4, Bp, D] before the m_0 term)."""
    names, args = ["pre", "states", "s0"], [pre, states, s0]
    if cfg.segments:
        names.append("keep")
        args.append(keep)
    names += ["dh", "d_final", "Rt", "d_pre", "d_init"]
    args += [dh, d_final, Rt4]
    return pl.pallas_call(
        functools.partial(_backward_kernel, cfg, names),
        grid=(cfg.H, cfg.Bp // cfg.batch_block),
        out_shape=[jax.ShapeDtypeStruct(pre.shape, F32), jax.ShapeDtypeStruct(s0.shape, F32)],
        compiler_params=compiler_params(),
        interpret=cfg.interpret,
        name="slstm_bwd",
    )(*args)
