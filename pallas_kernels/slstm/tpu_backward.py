"""Backward Pallas TPU kernel of the sLSTM recurrence (forward: tpu.py): the reverse scan of
xla.py's `_scan_bwd` in one kernel.

Grid (H, batch blocks, time blocks), the time blocks walked in reverse (index maps read block
nk - 1 - k). R^T, as [4, D, D], is resident in VMEM for the whole sequence (its block index never
changes); the adjoint carry (dc, dn, dm, dh_next) [4, Bb, D] float32 lives in a VMEM scratch. Each
step, from the forward's residuals (pre-activations and the (c, n, m) after every step):

    d pre_t, (dc, dn, dm) = cell_backward(pre_t, entering state, state_t, dh_t + dh_next, dc, dn, dm)
    dh_next = sum_g d pre_t,g R_g^T            (four [Bb, D] x [D, D] MXU matmuls)

then the carry is zeroed where a segment starts (the entering state was zeros there). The
entering (c, n, m) of step t is the state after t - 1: inside a block the previous row of the
same residual block; for the block's first step the row just before the block (a one-step
BlockSpec of the same array) or, for the first block, the initial state. The loop runs steps
tb - 1 .. 1 and then step 0 separately with that boundary row (no dynamic selects).

dR = sum_t h_{t-1}^T d pre_t is not accumulated here: it is one [D, T B] x [T B, 4D] matmul per
head after the kernel (kernel_cell.backward_outside), which uses the MXU far better than T rank-Bb
updates and needs no reduction across the parallel batch blocks. The stabiliser rule (dm_T from
the final-state cotangents, dm_0 += c_0 dc_0 + n_0 dn_0) is applied by the wrapper (tpu._fused_bwd).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from hybrax.pallas_kernels.slstm.kernel_cell import F32, cell_backward, dot
from hybrax.pallas_kernels.slstm.tpu import Config, compiler_params, specs


def _backward_kernel(cfg: Config, *refs):
    refs = list(refs)
    pre_ref, st_ref, before_ref, s0_ref = refs[:4]
    del refs[:4]
    keep_ref = refs.pop(0) if cfg.segments else None
    dh_ref, dfin_ref, rt_ref, dpre_ref, dinit_ref, carry_ref, boundary_ref = refs
    k = pl.program_id(2)
    block = cfg.nk - 1 - k

    @pl.when(k == 0)
    def _init():
        carry_ref[...] = dfin_ref[...]

    @pl.when(block == 0)
    def _from_initial_state():
        for g in range(3):
            boundary_ref[g] = s0_ref[g]

    @pl.when(block > 0)
    def _from_previous_block():
        for g in range(3):
            boundary_ref[g] = before_ref[g]

    def step(s, prev_ref, prev_row):
        prev = [prev_ref[prev_row, g] if prev_row is not None else prev_ref[g] for g in range(3)]
        dc, dn, dm, dh_next = (carry_ref[g] for g in range(4))
        keep = None
        if keep_ref is not None:
            keep = keep_ref[s] > 0  # [Bb, 1]
            prev = [jnp.where(keep, p, 0.0) for p in prev]
        pre = [pre_ref[s, g] for g in range(4)]
        new = [st_ref[s, g] for g in range(3)]
        dh = dh_ref[s].astype(F32) + dh_next
        d_pre, (dc, dn, dm) = cell_backward(pre, prev, new, dh, dc, dn, dm)
        for g in range(4):
            dpre_ref[s, g] = d_pre[g]
        dh_prev = sum(dot(d_pre[g], rt_ref[g], cfg.mxu_dtype) for g in range(4))
        carry = (dc, dn, dm, dh_prev)
        if keep is not None:
            carry = [jnp.where(keep, v, 0.0) for v in carry]

        def update():
            for g in range(4):
                carry_ref[g] = carry[g]

        if cfg.padded:  # steps past T: the carry passes through untouched
            pl.when(block * cfg.tb + s < cfg.T)(update)
        else:
            update()

    def body(j, carry):
        s = cfg.tb - 1 - j
        step(s, st_ref, s - 1)
        return carry

    lax.fori_loop(0, cfg.tb - 1, body, 0)
    step(0, boundary_ref, None)

    @pl.when(k == cfg.nk - 1)
    def _done():
        dinit_ref[...] = carry_ref[...]


def backward(cfg: Config, pre, states, s0, keep, dh, d_final, Rt4):
    """Kernel-level backward: residuals pre [H, Tp, 4, Bp, D], states [H, Tp, 3, Bp, D], s0 and
    d_final (dc, dn, dm_last, dh) [H, 4, Bp, D], Rt4 [H, 4, D, D] (R_g^T), dh [H, Tp, Bp, D]
    -> (d pre [H, Tp, 4, Bp, D] float32, d initial state [H, 4, Bp, D] before the m_0 term)."""
    spec = specs(cfg, reverse=True)
    Tp = cfg.nk * cfg.tb
    args = [pre, states, states, s0]
    in_specs = [spec["gates"](4), spec["gates"](3), spec["before"], spec["state"]]
    if cfg.segments:
        args.append(keep)
        in_specs.append(spec["keep"])
    args += [dh, d_final, Rt4]
    in_specs += [spec["steps"], spec["state"], spec["weights"]]
    return pl.pallas_call(
        functools.partial(_backward_kernel, cfg),
        grid=(cfg.H, cfg.Bp // cfg.batch_block, cfg.nk),
        in_specs=in_specs,
        out_specs=[spec["gates"](4), spec["state"]],
        out_shape=[jax.ShapeDtypeStruct((cfg.H, Tp, 4, cfg.Bp, cfg.D), F32),
                   jax.ShapeDtypeStruct((cfg.H, 4, cfg.Bp, cfg.D), F32)],
        scratch_shapes=[pltpu.VMEM((4, cfg.batch_block, cfg.D), F32),
                        pltpu.VMEM((3, cfg.batch_block, cfg.D), F32)],
        compiler_params=compiler_params(),
        interpret=cfg.interpret,
        name="slstm_bwd",
    )(*args)
