"""The sLSTM recurrence as one fused Pallas Mosaic TPU kernel per direction (FlashRNN-style).

    (i~, f~, z~, o~)_t = gate_inputs_t + h_{t-1} R,   lf_t = log_sigmoid(f~_t),   m_t = max(lf_t + m_{t-1}, i~_t)
    c_t = f'_t c_{t-1} + i'_t tanh(z~_t),   n_t = f'_t n_{t-1} + i'_t,   h_t = sigmoid(o~_t) c_t / n_t

(Beck et al. 2024, sLSTM; the kernel design of FlashRNN, Pöppel et al. 2024: the recurrent weights
stay on chip for the whole sequence and one kernel runs all time steps.)

Grid (H, batch blocks, time blocks): heads and batch blocks are independent ("parallel"), the
time-block axis is sequential ("arbitrary"). The head's R, as [4, D, D] (one [D, D] matrix per gate,
so no lane slicing of a fused [D, 4D] result for D < 128), has a block index that never changes
along the grid's time axis, so Pallas copies it to VMEM once per (head, batch block) and it stays
resident for the whole sequence. The state (c, n, m, h) [4, Bb, D] float32 lives in a VMEM scratch
across time blocks; inside a block a `fori_loop` runs the steps: pre_g = x_t,g + h_{t-1} R_g
(four [Bb, D] x [D, D] MXU matmuls, float32 accumulation, bfloat16 operands when gate_inputs and R
are bfloat16, float32 operands at full precision otherwise), then the stabilised cell (pointwise,
float32, kernel_cell.py). With a backward to follow it also writes the residuals xla.py saves:
the pre-activations [T, 4, B, D] and (c, n, m) [T, 3, B, D] after each step, float32.

Why time blocks: the whole sequence of one (head, batch block) does not fit VMEM (T = 4096, Bb =
8, D = 128 float32 gate inputs alone are 64 MiB; v5e's scoped VMEM is 16 MiB), so gate inputs,
h and the residuals stream through BlockSpecs of `tb` steps (double-buffered DMA behind the
compute), tb chosen so that the blocks take about 8 MiB. T is zero padded to a whole number of
blocks; padded steps (at the end) do not update the state. B is padded to a multiple of 8 (the
sublane tile), blocks of at most 128 rows; D is not padded (blocks span the full D).

Segments: a [T, B, 1] float32 keep flag (0 where a segment starts) zeroes the entering state.
Off TPU the kernel runs in Pallas interpret mode; the backward is tpu_backward.py.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from hybrax.pallas_kernels.implementation import interpret_mode
from hybrax.pallas_kernels.slstm.kernel_cell import (F32, cell, dot, finish, mxu_dtype, prepare,
                                                     refuse_unsupported, with_own_backward)

BLOCK_BYTES = 8 * 2 ** 20      # double-buffered time blocks of the forward or backward
MAX_R_BYTES = 4 * 2 ** 20      # R [4, D, D] is double-buffered too: refuse larger heads
MAX_TIME_BLOCK = 128
MAX_BATCH_BLOCK = 128


@dataclasses.dataclass(frozen=True)
class Config:
    T: int                 # true length; Tp = nk * tb padded
    tb: int                # steps per time block
    nk: int                # time blocks
    batch_block: int       # Bb
    Bp: int                # padded batch
    H: int
    D: int
    mxu_dtype: str         # "bfloat16" or "float32"
    x_dtype: str           # gate_inputs' dtype (of d gate_inputs)
    segments: bool
    interpret: object      # False, True or pltpu.InterpretParams()

    @property
    def padded(self) -> bool:
        return self.nk * self.tb != self.T


def make_config(gate_inputs, recurrent_weights, segment_ids, interpret) -> Config:
    B, T, H, _, D = gate_inputs.shape
    mxu = mxu_dtype(gate_inputs, recurrent_weights)
    r_bytes = 4 * D * D * jnp.dtype(mxu).itemsize
    if r_bytes > MAX_R_BYTES:
        raise NotImplementedError(f"pallas_tpu slstm keeps R [4, D, D] in VMEM; D = {D} ({r_bytes >> 20} MiB) "
                                  f"is over {MAX_R_BYTES >> 20} MiB")
    Bp = -(-B // 8) * 8
    if Bp > MAX_BATCH_BLOCK:
        Bp = -(-B // MAX_BATCH_BLOCK) * MAX_BATCH_BLOCK
    Bb = min(Bp, MAX_BATCH_BLOCK)
    # bytes per step, backward (the larger): pre + states + d pre (float32), dh, keep (lane padded)
    per_step = Bb * D * 4 * (4 + 3 + 4 + 1) + Bb * 128 * 4
    tb_max = max(1, min(MAX_TIME_BLOCK, BLOCK_BYTES // (2 * per_step)))
    nk = -(-max(T, 1) // tb_max)
    tb = -(-max(T, 1) // nk)
    return Config(T, tb, nk, Bb, Bp, H, D, mxu, jnp.dtype(gate_inputs.dtype).name, segment_ids is not None,
                  interpret)


def compiler_params():
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def specs(cfg: Config, reverse: bool = False):
    """BlockSpec factories on grid (H, batch blocks, time blocks); reverse walks time blocks backwards."""
    Bb, D, tb, nk = cfg.batch_block, cfg.D, cfg.tb, cfg.nk
    blk = (lambda k: nk - 1 - k) if reverse else (lambda k: k)
    return dict(
        gates=lambda n: pl.BlockSpec((None, tb, n, Bb, D), lambda h, b, k: (h, blk(k), 0, b, 0)),
        steps=pl.BlockSpec((None, tb, Bb, D), lambda h, b, k: (h, blk(k), b, 0)),
        keep=pl.BlockSpec((tb, Bb, 1), lambda h, b, k: (blk(k), b, 0)),
        state=pl.BlockSpec((None, 4, Bb, D), lambda h, b, k: (h, 0, b, 0)),
        weights=pl.BlockSpec((None, 4, D, D), lambda h, b, k: (h, 0, 0, 0)),
        # the (c, n, m) row just before the time block (clamped at the first block)
        before=pl.BlockSpec((None, None, 3, Bb, D),
                            lambda h, b, k: (h, jnp.maximum(blk(k) * tb - 1, 0), 0, b, 0)),
    )


def _forward_kernel(cfg: Config, save: bool, *refs):
    refs = list(refs)
    x_ref, r_ref, s0_ref = refs[:3]
    del refs[:3]
    keep_ref = refs.pop(0) if cfg.segments else None
    h_ref, final_ref = refs[:2]
    del refs[:2]
    pre_ref, st_ref = (refs.pop(0), refs.pop(0)) if save else (None, None)
    (state_ref,) = refs
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _init():
        state_ref[...] = s0_ref[...]

    def step(s, carry):
        c, n, m, h = (state_ref[g] for g in range(4))
        if keep_ref is not None:
            keep = keep_ref[s] > 0  # [Bb, 1]: 0 where a segment starts here
            c, n, m, h = (jnp.where(keep, v, 0.0) for v in (c, n, m, h))
        pre = [x_ref[s, g].astype(F32) + dot(h, r_ref[g], cfg.mxu_dtype) for g in range(4)]
        new = cell(*pre, c, n, m)
        h_ref[s] = new[3].astype(h_ref.dtype)
        if save:
            for g in range(4):
                pre_ref[s, g] = pre[g]
            for g in range(3):
                st_ref[s, g] = new[g]

        def update():
            for g in range(4):
                state_ref[g] = new[g]

        if cfg.padded:  # steps past T (padding at the end) leave the state alone
            pl.when(k * cfg.tb + s < cfg.T)(update)
        else:
            update()
        return carry

    lax.fori_loop(0, cfg.tb, step, 0)

    @pl.when(k == cfg.nk - 1)
    def _final():
        final_ref[...] = state_ref[...]


def forward(cfg: Config, x, R4, s0, keep, save: bool):
    """Kernel-level forward: x [H, Tp, 4, Bp, D], R4 [H, 4, D, D], s0 [H, 4, Bp, D], keep [Tp, Bp, 1]
    -> h [H, Tp, Bp, D], final [H, 4, Bp, D] (+ pre [H, Tp, 4, Bp, D], states [H, Tp, 3, Bp, D])."""
    spec = specs(cfg)
    Tp = cfg.nk * cfg.tb
    args, in_specs = [x, R4, s0], [spec["gates"](4), spec["weights"], spec["state"]]
    if cfg.segments:
        args.append(keep)
        in_specs.append(spec["keep"])
    out_shape = [jax.ShapeDtypeStruct((cfg.H, Tp, cfg.Bp, cfg.D), x.dtype),
                 jax.ShapeDtypeStruct((cfg.H, 4, cfg.Bp, cfg.D), F32)]
    out_specs = [spec["steps"], spec["state"]]
    if save:
        out_shape += [jax.ShapeDtypeStruct((cfg.H, Tp, 4, cfg.Bp, cfg.D), F32),
                      jax.ShapeDtypeStruct((cfg.H, Tp, 3, cfg.Bp, cfg.D), F32)]
        out_specs += [spec["gates"](4), spec["gates"](3)]
    return pl.pallas_call(
        functools.partial(_forward_kernel, cfg, save),
        grid=(cfg.H, cfg.Bp // cfg.batch_block, cfg.nk),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((4, cfg.batch_block, cfg.D), F32)],
        compiler_params=compiler_params(),
        interpret=cfg.interpret,
        name="slstm_fwd",
    )(*args)


def _backward():
    from hybrax.pallas_kernels.slstm.tpu_backward import backward
    return backward


_fused = with_own_backward(forward, _backward)


def slstm_kernel(gate_inputs, recurrent_weights, *, initial_state, segment_ids, return_final_state: bool,
                 interpret=None):
    """The contract's signature plus `interpret` (None: compiled on a TPU, interpreted on a CPU,
    refused on a GPU)."""
    refuse_unsupported("pallas_tpu slstm", gate_inputs, recurrent_weights, initial_state)
    if interpret is None:
        interpret = interpret_mode("pallas_tpu slstm", "tpu")
    cfg = make_config(gate_inputs, recurrent_weights, segment_ids, interpret)
    x, R4, s0, keep = prepare(gate_inputs, recurrent_weights, initial_state, segment_ids,
                              cfg.nk * cfg.tb, cfg.Bp, cfg.D)
    h, final = _fused(cfg, x, R4.astype(cfg.mxu_dtype), s0, keep)
    return finish(h, final, gate_inputs.shape, gate_inputs.dtype, return_final_state)


def slstm(gate_inputs: jax.Array, recurrent_weights: jax.Array, *, initial_state, segment_ids,
          return_final_state: bool):
    """Pallas TPU sLSTM: h [B, T, H, D] in gate_inputs' dtype, final state (c, n, m, h) float32."""
    return slstm_kernel(gate_inputs, recurrent_weights, initial_state=initial_state,
                        segment_ids=segment_ids, return_final_state=return_final_state)
