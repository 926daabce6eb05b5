"""Chunked mLSTM as Pallas GPU kernels (Triton backend), forward and backward (custom_vjp).

Same op and chunked form as tpu.py (the stabilised mLSTM of xLSTM, Beck et al. 2024; chunkwise as
in xLSTM 7B, Beck et al. 2025), with the same per-chunk math (chunk_math.py):

    m_i = max(z_i + m' [reaches i], max_j w_ij),   P_ij = exp(w_ij - m_i),   e_i = exp(z_i + m' - m_i)
    h = ((scale q k^T * P) v + e scale q C) / max(|rowsum(scale q k^T * P) + e scale q . n|, exp(-m))

Backend: Pallas' Triton lowering, written with generic Pallas ops only (ref loads with `pl.ds`,
jnp arithmetic, `jnp.dot`, `lax.fori_loop`), as linear_attention/gpu.py. Mosaic GPU is jax's
future GPU path, but its kernels are written for Hopper warpgroups (TMA, WGMMA, explicit shared
memory layouts) and could not be checked in this CPU-only session; the Triton lowering is what
linear_attention uses and covers every Ampere-and-later GPU. Triton wants power-of-two block
shapes of at least 16 for `dot`: the wrapper zero-pads K and V to such sizes (exact: padded
channels carry zeros) and rounds the chunk up to one (the chunk only changes the order of float32
sums, not the result).

Grid (B, H, V / BV). Each program owns a [K, BV] slice of C and its own copy of n [1, K] and m
[1, 1] (the denominator and stabilisers are recomputed in every value block) and walks all chunks
in a `fori_loop` (GPU grids have no sequential axis). The forward saves the state entering every
chunk for the backward (gpu_backward.py). Dots take bfloat16 operands for bfloat16 inputs, else
float32 operands at IEEE precision (not TF32); the decay matmul is always float32; accumulation is
float32. Off GPU the kernels run in interpret mode.

Status: matches the float64 reference in interpret mode and lowers to Triton IR for an H100, but
has not run on a GPU. jax warns that the Pallas Triton backend is deprecated.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from hybrax.pallas_kernels.implementation import interpret_mode
from hybrax.pallas_kernels.mlstm import chunk_math, chunking
from hybrax.pallas_kernels.mlstm.chunk_math import NN, NT, TN

F32 = chunk_math.F32
MAX_VALUE_BLOCK = 64


def _dot(x, y, dims, low_precision: bool):
    x = x.T if dims == TN else x
    y = y.T if dims == NT else y
    if low_precision:
        return jnp.dot(x.astype(jnp.bfloat16), y.astype(jnp.bfloat16), preferred_element_type=F32)
    return jnp.dot(x, y, precision=lax.Precision.HIGHEST, preferred_element_type=F32)


def exact_mm(x, y, dims=NN):
    """float32 x @ y (or a transpose) at IEEE precision."""
    return _dot(x, y, dims, False)


@dataclasses.dataclass(frozen=True)
class Config:
    layout: chunking.Layout  # K and V here are the padded sizes
    scale: float
    value_block: int
    has_initial_state: bool
    interpret: bool
    mxu_dtype: str = "float32"  # "bfloat16" when q, k, v are: dots take bf16 operands

    def mm(self, x, y, dims=NN):
        return _dot(x, y, dims, self.mxu_dtype == "bfloat16")

    @property
    def num_value_blocks(self) -> int:
        return self.layout.value_dim // self.value_block


def compiler_params():
    return pltriton.CompilerParams(num_warps=4, num_stages=1)


class ChunkView:
    """Loads of one chunk of one (batch, head, value block) from whole-array refs."""

    def __init__(self, config: Config, refs: dict, program, i):
        self.config, self.refs = config, refs
        self.b, self.h, self.j = program  # program ids, read outside loops (interpret mode)
        self.i = i
        self.t0 = i * config.layout.chunk
        self.values = pl.ds(self.j * config.value_block, config.value_block)

    def tokens(self, name, sliced=False):
        return self.refs[name][self.b, self.h, pl.ds(self.t0, self.config.layout.chunk),
                               self.values if sliced else slice(None)]

    def row(self, name):
        ref = self.refs[name]
        return ref[self.b, 0 if ref.shape[1] == 1 else self.h, self.i]  # [1, C]

    def weights(self, m_in):
        lay = self.config.layout
        seg = (self.row("count"), self.row("in_flag")) if lay.has_segments else (None, None)
        return chunk_math.gate_weights(lay.chunk, lay.seq_len, self.i, self.row("li"), self.row("lf"), *seg,
                                       m_in, exact_mm)

    def qkv(self):
        return (self.tokens("q").astype(F32), self.tokens("k").astype(F32), self.tokens("v", True).astype(F32))


def _forward_kernel(config: Config, names, *refs):
    lay, bv = config.layout, config.value_block
    refs = dict(zip(names, refs))
    b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    values = pl.ds(j * bv, bv)
    if config.has_initial_state:
        state0 = (refs["c0"][b, h, :, values], refs["n0"][b, h], refs["m0"][b, h])
    else:
        state0 = (jnp.zeros((lay.key_dim, bv), F32), jnp.zeros((1, lay.key_dim), F32), jnp.zeros((1, 1), F32))

    def chunk(i, state):
        c_in, n_in, m_in = state
        view = ChunkView(config, refs, (b, h, j), i)
        if "c_states" in refs:
            refs["c_states"][b, h, i, :, values] = c_in
            refs["n_states"][b, h, i] = n_in
            refs["m_states"][b, h, i] = m_in
        weights = view.weights(m_in)
        q, k, v = view.qkv()
        out = chunk_math.outputs(config.scale, config.mm, q, k, v, weights, c_in, n_in)
        refs["h"][b, h, pl.ds(view.t0, lay.chunk), values] = out["h"].astype(refs["h"].dtype)
        return chunk_math.next_state(config.mm, k, v, weights, c_in, n_in)

    c, n, m = lax.fori_loop(0, lay.num_chunks, chunk, state0)
    refs["c_final"][b, h, :, values] = c
    refs["n_final"][b, h] = n  # the same in every value block
    refs["m_final"][b, h] = m


def kernel_inputs(q, k, v, li, lf, state0, seg):
    """(names, arrays) of the kernels' common inputs, in call order."""
    names, args = ["q", "k", "v", "li", "lf"], [q, k, v, li, lf]
    if state0 is not None:
        names += ["c0", "n0", "m0"]
        args += list(state0)
    if seg:
        names += ["count", "in_flag"]
        args += list(seg)
    return names, args


def forward(config: Config, q, k, v, li, lf, state0, seg, save_states: bool):
    """Kernel-level forward on [B, H, Tp, *] inputs -> (h, C, n, m[, states entering each chunk])."""
    lay = config.layout
    names, args = kernel_inputs(q, k, v, li, lf, state0, seg)
    bh = (lay.batch, lay.heads)
    shapes = ((lay.key_dim, lay.value_dim), (1, lay.key_dim), (1, 1))
    out_shape = [jax.ShapeDtypeStruct(bh + (lay.padded_len, lay.value_dim), v.dtype)]
    out_shape += [jax.ShapeDtypeStruct(bh + s, F32) for s in shapes]
    names += ["h", "c_final", "n_final", "m_final"]
    if save_states:
        out_shape += [jax.ShapeDtypeStruct(bh + (lay.num_chunks,) + s, F32) for s in shapes]
        names += ["c_states", "n_states", "m_states"]
    outs = pl.pallas_call(
        functools.partial(_forward_kernel, config, names),
        grid=(lay.batch, lay.heads, config.num_value_blocks),
        out_shape=out_shape,
        compiler_params=compiler_params(),
        interpret=config.interpret,
        name="mlstm_fwd",
    )(*args)
    return (*outs[:4], tuple(outs[4:])) if save_states else tuple(outs)


def _backward():
    from hybrax.pallas_kernels.mlstm.gpu_backward import backward
    return backward


_chunked = chunking.with_own_backward(forward, _backward, with_output=True)


def _pow2_at_least_16(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def mlstm_kernel(q, k, v, log_input_gate, log_forget_gate, *, scale: float, initial_state, segment_ids,
                 return_final_state: bool, chunk_size: int, interpret=None):
    """The contract's signature plus `interpret` (None: compiled on a GPU, interpreted on a CPU, refused on a TPU)."""
    chunking.check_supported("pallas_gpu mlstm", q, k, v)
    if interpret is None:
        interpret = interpret_mode("pallas_gpu mlstm", "gpu")
    key_dim, value_dim = q.shape[-1], v.shape[-1]
    kp, vp = _pow2_at_least_16(key_dim) - key_dim, _pow2_at_least_16(value_dim) - value_dim
    pad = lambda x, *widths: jnp.pad(x, [(0, 0)] * (x.ndim - len(widths)) + [(0, w) for w in widths])
    chunk = _pow2_at_least_16(min(chunk_size, q.shape[1]))  # Triton block shapes; same result, any chunk
    layout = chunking.make_layout(pad(q, kp), pad(v, vp), segment_ids, chunk)
    low_precision = all(x.dtype == jnp.bfloat16 for x in (q, k, v))
    config = Config(layout, float(scale), min(layout.value_dim, MAX_VALUE_BLOCK), initial_state is not None,
                    interpret, "bfloat16" if low_precision else "float32")
    state0 = chunking.enter_state(initial_state)
    if state0 is not None:
        state0 = (pad(state0[0], kp, vp), pad(state0[1], kp)[:, :, None, :], state0[2][:, :, None, None])
    rows = lambda x: chunking.gate_rows(x, layout)[:, :, :, None, :]  # [B, H, NC, 1, C]
    seg = tuple(x[:, :, :, None, :] for x in chunking.segment_rows(segment_ids, layout))
    heads = lambda x, width: chunking.to_heads(pad(x, width), layout)
    h, c, n, m = _chunked(config, heads(q, kp), heads(k, kp), heads(v, vp), rows(log_input_gate),
                          rows(log_forget_gate), state0, seg)
    h = chunking.from_heads(h, layout)[..., :value_dim]
    if not return_final_state:
        return h, None
    m0 = None if initial_state is None else initial_state[2]
    m_exact = chunking.final_m(log_input_gate, log_forget_gate, m0, segment_ids)
    return h, chunking.leave_state(c[:, :, :key_dim, :value_dim], n[:, :, 0, :key_dim], m[:, :, 0, 0], m_exact)


def mlstm(q, k, v, log_input_gate, log_forget_gate, *, scale, initial_state, segment_ids,
          return_final_state, chunk_size):
    """Pallas GPU mLSTM: h [B, T, H, V] in v's dtype, final state (C, n, m) float32."""
    return mlstm_kernel(q, k, v, log_input_gate, log_forget_gate, scale=scale, initial_state=initial_state,
                        segment_ids=segment_ids, return_final_state=return_final_state, chunk_size=chunk_size)
