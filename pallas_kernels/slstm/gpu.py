"""The sLSTM recurrence as one fused Pallas GPU kernel per direction (Triton backend).

Same op and algorithm as tpu.py (Beck et al. 2024, sLSTM; FlashRNN's one-kernel design, Pöppel et
al. 2024):

    pre_t = gate_inputs_t + h_{t-1} R,   (c, n, m, h)_t = stabilised cell (kernel_cell.py)

Backend: Pallas' Triton lowering, written with generic Pallas ops only (ref loads and stores with
`pl.ds`, jnp arithmetic, `jnp.dot` of power-of-two blocks >= 16, `lax.fori_loop` over time), as
linear_attention/gpu.py. Mosaic GPU is jax's future GPU path (Hopper warpgroups, TMA, explicit
shared memory: the way to keep R truly resident in shared memory / registers across steps), but
could not be checked in this CPU-only session; the Triton lowering is what linear_attention uses.

Grid (H, batch blocks): one program per head and block of Bb rows walks all T steps in a
`fori_loop` with the state (c, n, m, h) [Bb, D] float32 in registers (the loop carry). Each step
loads the head's four [D, D] gate matrices of R (after the first step they come from L2: Triton
has no way to pin 4 D^2 floats in one program's registers or shared memory for D = 128; FlashRNN
splits R over many cooperating thread blocks for that), computes pre_g = x_t,g + h R_g with
float32 accumulation (bfloat16 operands for bfloat16 inputs, else float32 at IEEE precision, not
TF32), the cell, and stores h_t and, with a backward to follow, the residuals (pre-activations
and (c, n, m) after each step, float32). D is zero padded to a power of two >= 16 and B to a
multiple of Bb (>= 16, a Triton dot's minimum): padded channels and rows stay finite and are
dropped. Off GPU the kernel runs in interpret mode; the backward is gpu_backward.py.

Status: matches the float64 reference in interpret mode and lowers to Triton IR for an H100; it
has not run on a GPU. Parallelism is H * B / Bb programs each walking the sequence.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from hybrax.pallas_kernels.implementation import interpret_mode
from hybrax.pallas_kernels.slstm.kernel_cell import (F32, cell, dot, finish, mxu_dtype, prepare,
                                                     refuse_unsupported, with_own_backward)

MAX_BATCH_BLOCK = 32
MAX_DIM = 256  # R_g [D, D] is loaded whole per step: beyond this it no longer fits a program


@dataclasses.dataclass(frozen=True)
class Config:
    T: int
    batch_block: int   # Bb, a power of two >= 16
    Bp: int            # padded batch, a multiple of Bb
    H: int
    D: int             # padded head dim, a power of two >= 16
    mxu_dtype: str
    x_dtype: str
    segments: bool
    interpret: bool


def _pow2_at_least_16(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def make_config(gate_inputs, recurrent_weights, segment_ids, interpret) -> Config:
    B, T, H, _, D = gate_inputs.shape
    Dp = _pow2_at_least_16(D)
    if Dp > MAX_DIM:
        raise NotImplementedError(f"pallas_gpu slstm loads R_g [D, D] whole per step; D = {D} is over {MAX_DIM}")
    Bb = min(_pow2_at_least_16(B), MAX_BATCH_BLOCK)
    Bp = -(-B // Bb) * Bb
    return Config(T, Bb, Bp, H, Dp, mxu_dtype(gate_inputs, recurrent_weights), jnp.dtype(gate_inputs.dtype).name,
                  segment_ids is not None, interpret)


def compiler_params():
    return pltriton.CompilerParams(num_warps=4, num_stages=1)


def _forward_kernel(cfg: Config, save: bool, names, *refs):
    refs = dict(zip(names, refs))
    head, block = pl.program_id(0), pl.program_id(1)  # read outside the loop (interpret mode)
    rows = pl.ds(block * cfg.batch_block, cfg.batch_block)
    state0 = tuple(refs["s0"][head, g, rows, :] for g in range(4))

    def step(t, state):
        c, n, m, h = state
        if cfg.segments:
            keep = refs["keep"][t, rows, :] > 0  # [Bb, 1]: 0 where a segment starts here
            c, n, m, h = (jnp.where(keep, v, 0.0) for v in (c, n, m, h))
        pre = [refs["x"][head, t, g, rows, :].astype(F32) + dot(h, refs["R"][head, g, :, :], cfg.mxu_dtype)
               for g in range(4)]
        new = cell(*pre, c, n, m)
        refs["h"][head, t, rows, :] = new[3].astype(refs["h"].dtype)
        if save:
            for g in range(4):
                refs["pre"][head, t, g, rows, :] = pre[g]
            for g in range(3):
                refs["states"][head, t, g, rows, :] = new[g]
        return new

    final = lax.fori_loop(0, cfg.T, step, state0)
    for g in range(4):
        refs["final"][head, g, rows, :] = final[g]


def forward(cfg: Config, x, R4, s0, keep, save: bool):
    """Kernel-level forward: x [H, T, 4, Bp, D], R4 [H, 4, D, D], s0 [H, 4, Bp, D], keep [T, Bp, 1]
    -> h [H, T, Bp, D], final [H, 4, Bp, D] (+ pre [H, T, 4, Bp, D], states [H, T, 3, Bp, D])."""
    names, args = ["x", "R", "s0"], [x, R4, s0]
    if cfg.segments:
        names.append("keep")
        args.append(keep)
    out_shape = [jax.ShapeDtypeStruct((cfg.H, cfg.T, cfg.Bp, cfg.D), x.dtype),
                 jax.ShapeDtypeStruct((cfg.H, 4, cfg.Bp, cfg.D), F32)]
    names += ["h", "final"]
    if save:
        out_shape += [jax.ShapeDtypeStruct((cfg.H, cfg.T, 4, cfg.Bp, cfg.D), F32),
                      jax.ShapeDtypeStruct((cfg.H, cfg.T, 3, cfg.Bp, cfg.D), F32)]
        names += ["pre", "states"]
    return pl.pallas_call(
        functools.partial(_forward_kernel, cfg, save, names),
        grid=(cfg.H, cfg.Bp // cfg.batch_block),
        out_shape=out_shape,
        compiler_params=compiler_params(),
        interpret=cfg.interpret,
        name="slstm_fwd",
    )(*args)


def _backward():
    from hybrax.pallas_kernels.slstm.gpu_backward import backward
    return backward


_fused = with_own_backward(forward, _backward)


def slstm_kernel(gate_inputs, recurrent_weights, *, initial_state, segment_ids, return_final_state: bool,
                 interpret=None):
    """The contract's signature plus `interpret` (None: compiled on a GPU, interpreted on a CPU,
    refused on a TPU)."""
    refuse_unsupported("pallas_gpu slstm", gate_inputs, recurrent_weights, initial_state)
    if interpret is None:
        interpret = interpret_mode("pallas_gpu slstm", "gpu")
    cfg = make_config(gate_inputs, recurrent_weights, segment_ids, interpret)
    x, R4, s0, keep = prepare(gate_inputs, recurrent_weights, initial_state, segment_ids,
                              gate_inputs.shape[1], cfg.Bp, cfg.D)
    h, final = _fused(cfg, x, R4.astype(cfg.mxu_dtype), s0, keep)
    return finish(h, final, gate_inputs.shape, gate_inputs.dtype, return_final_state)


def slstm(gate_inputs: jax.Array, recurrent_weights: jax.Array, *, initial_state, segment_ids,
          return_final_state: bool):
    """Pallas GPU sLSTM: h [B, T, H, D] in gate_inputs' dtype, final state (c, n, m, h) float32."""
    return slstm_kernel(gate_inputs, recurrent_weights, initial_state=initial_state,
                        segment_ids=segment_ids, return_final_state=return_final_state)
