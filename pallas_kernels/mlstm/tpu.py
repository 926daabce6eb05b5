"""Chunked mLSTM as Pallas Mosaic TPU kernels, forward and backward (custom_vjp).

The stabilised mLSTM of xLSTM (Beck et al. 2024; chunkwise form of xLSTM 7B, Beck et al. 2025):

    m_t = max(lf_t + m_{t-1}, li_t),   C_t = exp(lf_t + m_{t-1} - m_t) C_{t-1} + exp(li_t - m_t) k_t^T v_t
    n_t likewise with k_t,             h_t = (scale q_t C_t) / max(|scale q_t . n_t|, exp(-m_t))

Per chunk of L tokens (xla.py derives it), with (C, n, m') the state entering the chunk, D[i, j] =
lf_{j+1} + .. + lf_i, w_ij = D[i, j] + li_j (j feeds i: j <= i, same segment, not padding) and z_i
the decay of the state reaching i (from the chunk start, or from i's segment start, where the zero
state with m = 0 entered):

    m_i = max(z_i + m' [reaches i], max_j w_ij),   P_ij = exp(w_ij - m_i),   e_i = exp(z_i + m' - m_i) [reaches]
    num = (scale q k^T * P) v + e * scale q C,     den = rowsum(scale q k^T * P) + e * scale q . n
    h = num / max(|den|, exp(-m)),                 state leaving: row L of the same (a = P[L, :], f = e_L)

Every exponent is <= 0. D comes from one float32 matmul of the masked gates with a 0/1 triangle, so
each entry is a direct sum over (j, i], not a difference of long prefix sums.

Grid (B, H, chunks); the chunk axis is sequential ("arbitrary") and carries (C [K, V], n [1, K],
m [1, 1]) in VMEM scratch. When a backward follows, the forward writes the state entering every
chunk (C in the matmul operand dtype, n and m float32); tpu_backward.py walks the chunks in reverse
carrying dC, dn. Stabilisers are constants to both (chunking.py restores the final m's gradient).

Precision: matmuls accumulate in float32; their operands are float32 (at HIGHEST precision), or
bfloat16 when q, k and v are bfloat16 (scores, P-weighted keys and the state rounded to bfloat16
before the MXU). The decay matmul, gates, stabilisers and all elementwise math stay float32.
chunk_size is capped at T and rounded up to a multiple of 8 (the sublane tile): the chunk changes
only the order of float32 sums. Off TPU the kernels run in Pallas interpret mode.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from hybrax.pallas_kernels.implementation import interpret_mode
from hybrax.pallas_kernels.mlstm import chunk_math, chunking
from hybrax.pallas_kernels.mlstm.chunk_math import NN

F32 = chunk_math.F32


@dataclasses.dataclass(frozen=True)
class Config:
    layout: chunking.Layout
    scale: float
    has_initial_state: bool
    interpret: object  # False, True or pltpu.InterpretParams()
    mxu_dtype: str = "float32"  # "bfloat16" when q, k, v are: the big matmuls take bf16 operands

    def mm(self, x, y, dims=NN):
        """Matmul with float32 accumulation: bf16 operands, or float32 ones at full precision."""
        if self.mxu_dtype == "bfloat16":
            return lax.dot_general(x.astype(jnp.bfloat16), y.astype(jnp.bfloat16), dims, preferred_element_type=F32)
        return exact_dot(x, y, dims)


def exact_dot(x, y, dims=NN):
    return lax.dot_general(x.astype(F32), y.astype(F32), dims, precision=lax.Precision.HIGHEST,
                           preferred_element_type=F32)


def chunk_weights(config: Config, chunk_index, li_ref, lf_ref, segment_refs, m_in_1x1):
    """chunk_math.gate_weights from the resident gate rows [NC, L] (row `chunk_index`)."""
    lay = config.layout
    rows = lambda ref: ref[pl.ds(chunk_index, 1), :]
    count_row, in_row = (rows(ref) for ref in segment_refs) if segment_refs else (None, None)
    return chunk_math.gate_weights(lay.chunk, lay.seq_len, chunk_index, rows(li_ref), rows(lf_ref), count_row,
                                   in_row, m_in_1x1, exact_dot)


def compiler_params():
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def block_specs(config: Config, reverse: bool = False):
    """BlockSpec factories on grid (B, H, chunks)."""
    lay = config.layout
    nc, c = lay.num_chunks, lay.chunk
    chunk_of = (lambda i: nc - 1 - i) if reverse else (lambda i: i)
    return dict(
        head=lambda d: pl.BlockSpec((None, None, c, d), lambda b, h, i: (b, h, chunk_of(i), 0)),
        head_rows=pl.BlockSpec((None, None, nc, c), lambda b, h, i: (b, h, 0, 0)),
        batch_rows=pl.BlockSpec((None, None, nc, c), lambda b, h, i: (b, 0, 0, 0)),
        whole=lambda r, d: pl.BlockSpec((None, None, r, d), lambda b, h, i: (b, h, 0, 0)),
        per_chunk=lambda r, d: pl.BlockSpec((None, None, None, r, d), lambda b, h, i: (b, h, chunk_of(i), 0, 0)),
    )


def state_shapes(lay: chunking.Layout):
    """(rows, cols) of the kernels' C, n and m blocks."""
    return (lay.key_dim, lay.value_dim), (1, lay.key_dim), (1, 1)


def _forward_kernel(config: Config, save_states: bool, *refs):
    lay = config.layout
    refs = list(refs)
    q_ref, k_ref, v_ref, li_ref, lf_ref = refs[:5]
    del refs[:5]
    state0_refs = [refs.pop(0) for _ in range(3)] if config.has_initial_state else []
    segment_refs = [refs.pop(0) for _ in range(2)] if lay.has_segments else []
    h_ref, *final_refs = refs[:4]
    del refs[:4]
    states_refs = [refs.pop(0) for _ in range(3)] if save_states else []
    c_ref, n_ref, m_ref = refs
    i = pl.program_id(2)

    @pl.when(i == 0)
    def _init():
        for ref, ref0 in zip((c_ref, n_ref, m_ref), state0_refs or (None,) * 3):
            ref[...] = ref0[...] if ref0 is not None else jnp.zeros(ref.shape, F32)

    c_in, n_in, m_in = c_ref[...], n_ref[...], m_ref[...]
    for ref, value in zip(states_refs, (c_in, n_in, m_in)):
        ref[...] = value.astype(ref.dtype)
    weights = chunk_weights(config, i, li_ref, lf_ref, segment_refs, m_in)
    q, k, v = (ref[...].astype(F32) for ref in (q_ref, k_ref, v_ref))
    out = chunk_math.outputs(config.scale, config.mm, q, k, v, weights, c_in, n_in)
    h_ref[...] = out["h"].astype(h_ref.dtype)
    new_state = chunk_math.next_state(config.mm, k, v, weights, c_in, n_in)
    for ref, value in zip((c_ref, n_ref, m_ref), new_state):
        ref[...] = value

    @pl.when(i == lay.num_chunks - 1)
    def _final():
        for ref, value in zip(final_refs, new_state):
            ref[...] = value


def common_inputs(config: Config, q, k, v, li, lf, seg, reverse=False):
    lay = config.layout
    spec = block_specs(config, reverse)
    args = [q, k, v, li, lf]
    specs = [spec["head"](lay.key_dim), spec["head"](lay.key_dim), spec["head"](lay.value_dim),
             spec["head_rows"], spec["head_rows"]]
    return args, specs, list(seg), [spec["batch_rows"]] * len(seg)


def forward(config: Config, q, k, v, li, lf, state0, seg, save_states: bool):
    """Kernel-level forward on [B, H, Tp, *] inputs -> (h, C, n, m[, states entering each chunk])."""
    lay = config.layout
    spec = block_specs(config)
    args, in_specs, seg_args, seg_specs = common_inputs(config, q, k, v, li, lf, seg)
    shapes = state_shapes(lay)
    if state0 is not None:
        args += list(state0)
        in_specs += [spec["whole"](*s) for s in shapes]
    args += seg_args
    in_specs += seg_specs
    bh = (lay.batch, lay.heads)
    out_shape = [jax.ShapeDtypeStruct(bh + (lay.padded_len, lay.value_dim), v.dtype)]
    out_shape += [jax.ShapeDtypeStruct(bh + s, F32) for s in shapes]
    out_specs = [spec["head"](lay.value_dim)] + [spec["whole"](*s) for s in shapes]
    if save_states:
        dtypes = (jnp.dtype(config.mxu_dtype), F32, F32)  # C in the matmul operand dtype (bf16 halves it)
        out_shape += [jax.ShapeDtypeStruct(bh + (lay.num_chunks,) + s, dt) for s, dt in zip(shapes, dtypes)]
        out_specs += [spec["per_chunk"](*s) for s in shapes]
    return pl.pallas_call(
        functools.partial(_forward_kernel, config, save_states),
        grid=(lay.batch, lay.heads, lay.num_chunks),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM(s, F32) for s in shapes],
        compiler_params=compiler_params(),
        interpret=config.interpret,
        name="mlstm_fwd",
    )(*args)


def _pack(outs, save_states):
    return (*outs[:4], tuple(outs[4:])) if save_states else tuple(outs)


def _backward():
    from hybrax.pallas_kernels.mlstm.tpu_backward import backward
    return backward


_chunked = chunking.with_own_backward(lambda *a, save_states: _pack(forward(*a, save_states), save_states),
                                      _backward)


def mlstm_kernel(q, k, v, log_input_gate, log_forget_gate, *, scale: float, initial_state, segment_ids,
                 return_final_state: bool, chunk_size: int, interpret=None):
    """The contract's signature plus `interpret` (None: compiled on a TPU, interpreted on a CPU, refused on a GPU)."""
    chunking.check_supported("pallas_tpu mlstm", q, k, v)
    if interpret is None:
        interpret = interpret_mode("pallas_tpu mlstm", "tpu")
    B, T, H, K = q.shape
    chunk = -(-min(chunk_size, T) // 8) * 8  # a whole number of sublane tiles; same result, any chunk
    layout = chunking.make_layout(q, v, segment_ids, chunk)
    low_precision = all(x.dtype == jnp.bfloat16 for x in (q, k, v))
    config = Config(layout, float(scale), initial_state is not None, interpret,
                    "bfloat16" if low_precision else "float32")
    state0 = chunking.enter_state(initial_state)
    if state0 is not None:
        state0 = (state0[0], state0[1][:, :, None, :], state0[2][:, :, None, None])
    heads = lambda x: chunking.to_heads(x, layout)
    h, c, n, m = _chunked(config, heads(q), heads(k), heads(v), chunking.gate_rows(log_input_gate, layout),
                          chunking.gate_rows(log_forget_gate, layout), state0,
                          chunking.segment_rows(segment_ids, layout))
    h = chunking.from_heads(h, layout)
    if not return_final_state:
        return h, None
    m0 = None if initial_state is None else initial_state[2]
    m_exact = chunking.final_m(log_input_gate, log_forget_gate, m0, segment_ids)
    return h, chunking.leave_state(c, n[:, :, 0], m[:, :, 0, 0], m_exact)


def mlstm(q, k, v, log_input_gate, log_forget_gate, *, scale, initial_state, segment_ids,
          return_final_state, chunk_size):
    """Pallas TPU mLSTM: h [B, T, H, V] in v's dtype, final state (C, n, m) float32."""
    return mlstm_kernel(q, k, v, log_input_gate, log_forget_gate, scale=scale, initial_state=initial_state,
                        segment_ids=segment_ids, return_final_state=return_final_state, chunk_size=chunk_size)
