"""Chunked linear attention as Pallas Mosaic TPU kernels, forward and backward (custom_vjp).

Linear attention with decay (Katharopoulos et al. 2020; RetNet, Sun et al. 2023; Lightning
Attention, Qin et al. 2024; GLA, Yang et al. 2024; Mamba-2 SSD, Dao & Gu 2024):

    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,    o_t = scale * q_t S_t

q, k [B, T, H, K], v [B, T, H, V], g = log_decay None / [B, T, H] / [B, T, H, K] (<= 0),
state [B, H, K, V] float32. Chunked form (chunk of C tokens, b = within-chunk cumsum of g, b_C its
last row, P the intra-chunk decayed scores of tpu_chunk.py, S the state entering the chunk):

    o     = scale * (P v + (q * exp(b)) S)
    S_new = diag(exp(b_C)) S + (k * exp(b_C - b))^T v

Grid (B, H, chunks); the chunk axis is sequential ("arbitrary") and carries the state, stored
transposed ([V, K], so the per-channel decay is a lane broadcast) in a VMEM scratch. Per-token
decay and segment vectors travel as [NC, C] rows (tpu_chunk.chunk_vectors). When a backward
follows, the forward also writes the state entering every chunk ([B, H, NC, V, K], in the matmul
operand dtype) as its residual; tpu_backward.py walks the chunks in reverse carrying dS.

Precision: matmuls accumulate in float32; their operands are float32, or bfloat16 when q, k and v
are bfloat16 (decayed keys, scores and the state are then rounded to bfloat16 before the MXU, as in
flash-linear-attention). Decay weights, the carried state and all elementwise math stay float32.
Segment resets: the carried state reaches only tokens still in the chunk's first segment (`in`
flag), only tokens of the chunk's last segment enter it (`out` flag), and it survives the chunk
only if no segment starts in it.

Cost: scalar / no decay is MXU work (q k^T, P v, q S, v^T k per chunk). Per-channel decay
(tpu_gates.py) puts the off-diagonal sub-blocks of P on the MXU and does the 16 x 16 diagonal
blocks one query row at a time (C rows of [16, K] exponentials and 1-row matmuls per chunk): the
part that is VPU/EUP bound.

chunk_size is rounded up to a multiple of 8 (the sublane tile): the chunk only changes the order
of float32 sums, not the result. Off TPU the kernels run in Pallas interpret mode.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from hybrax.pallas_kernels.implementation import interpret_mode
from hybrax.pallas_kernels.linear_attention import chunking, tpu_gates
from hybrax.pallas_kernels.linear_attention.tpu_chunk import (F32, NT, TN, chunk_vectors, dot, pair_keep,
                                                        scalar_decay_weights)


@dataclasses.dataclass(frozen=True)
class Config:
    layout: chunking.Layout
    scale: float
    has_initial_state: bool
    interpret: object  # False, True or pltpu.InterpretParams()
    mxu_dtype: str = "float32"  # "bfloat16" when q, k, v are: the big matmuls take bf16 operands


def block_specs(config: Config, reverse: bool = False, state_dims: tuple[int, int] | None = None):
    """BlockSpec factories for the arrays the kernels read, on grid (B, H, chunks). The state block
    is [V, K] (these kernels hold S^T) unless `state_dims` says otherwise."""
    lay = config.layout
    nc, c = lay.num_chunks, lay.chunk
    chunk_of = (lambda i: nc - 1 - i) if reverse else (lambda i: i)
    state_dims = (lay.value_dim, lay.key_dim) if state_dims is None else state_dims
    return dict(
        head=lambda d: pl.BlockSpec((None, None, c, d), lambda b, h, i: (b, h, chunk_of(i), 0)),
        head_rows=pl.BlockSpec((None, None, nc, c), lambda b, h, i: (b, h, 0, 0)),
        batch_rows=pl.BlockSpec((None, None, nc, c), lambda b, h, i: (b, 0, 0, 0)),
        state=pl.BlockSpec((None, None, *state_dims), lambda b, h, i: (b, h, 0, 0)),
        chunk_state=pl.BlockSpec((None, None, None, *state_dims), lambda b, h, i: (b, h, chunk_of(i), 0, 0)),
    )


def gate_scratch_names(layout: chunking.Layout, backward: bool):
    """VMEM scratch of the per-channel (tpu_gates) path: float32 copies for row access, outputs."""
    if not layout.per_channel:
        return []
    names = ["q32", "k32", "v32"] + ["do32"] * backward + ["count"] * layout.has_segments
    return names + (["dq", "dk", "dv"] if backward else ["out"])


def gate_scratch(layout: chunking.Layout, backward: bool):
    width = dict(q32=layout.key_dim, k32=layout.key_dim, v32=layout.value_dim, do32=layout.value_dim,
                 count=1, out=layout.value_dim, dq=layout.key_dim, dk=layout.key_dim, dv=layout.value_dim)
    return [pltpu.VMEM((layout.chunk, width[name]), F32)
            for name in gate_scratch_names(layout, backward)]


def fill_gate_refs(gate_refs, b_ref, vec, **values):
    """Store the float32 copies that the per-channel row loops read at dynamic row offsets."""
    for name, value in values.items():
        gate_refs[name + "32"][...] = value
    gate_refs["b"] = b_ref
    if "count" in gate_refs:
        gate_refs["count"][...] = vec["count_col"]
    else:
        gate_refs["count"] = None


def compiler_params():
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _forward_kernel(config: Config, save_states: bool, *refs):
    lay = config.layout
    c = lay.chunk
    refs = list(refs)
    q_ref, k_ref, v_ref = refs[:3]
    del refs[:3]
    b_ref = refs.pop(0) if lay.has_decay else None
    s0_ref = refs.pop(0) if config.has_initial_state else None
    segment_refs = [refs.pop(0) for _ in range(3)] if lay.has_segments else []
    o_ref, final_ref = refs[:2]
    del refs[:2]
    states_ref = refs.pop(0) if save_states else None
    state_ref = refs.pop(0)
    gate_refs = dict(zip(gate_scratch_names(lay, backward=False), refs))
    i = pl.program_id(2)
    mm = functools.partial(dot, operand_dtype=jnp.dtype(config.mxu_dtype))

    @pl.when(i == 0)
    def _init():
        state_ref[...] = s0_ref[...] if s0_ref is not None else jnp.zeros(state_ref.shape, F32)

    state_VxK = state_ref[...]
    if states_ref is not None:
        states_ref[...] = state_VxK.astype(states_ref.dtype)
    q_CxK = q_ref[...].astype(F32)
    k_CxK = k_ref[...].astype(F32)
    v_CxV = v_ref[...].astype(F32)
    vec = chunk_vectors(lay, i, b_ref, segment_refs)
    b_CxG = vec["b"]
    b_last_1xG = b_CxG[c - 1:c, :]
    q_decayed = q_CxK * jnp.exp(b_CxG)
    k_decayed = k_CxK * jnp.exp(b_last_1xG - b_CxG)
    if lay.has_segments:
        q_decayed = q_decayed * vec["in_col"]
        k_decayed = k_decayed * vec["out_col"]
    if lay.per_channel:
        fill_gate_refs(gate_refs, b_ref, vec, q=q_CxK, k=k_CxK, v=v_CxV)
        pv_CxV = tpu_gates.scores_times_values(gate_refs, q_CxK, k_CxK, v_CxV, b_CxG, vec["count_col"],
                                               vec["count_row"], c, mm)
    else:
        keep = pair_keep(c, vec["count_col"], vec["count_row"])
        pv_CxV = mm(mm(q_CxK, k_CxK, NT) * scalar_decay_weights(b_CxG, vec["b_row"], keep), v_CxV)
    o_ref[...] = (config.scale * (pv_CxV + mm(q_decayed, state_VxK, NT))).astype(o_ref.dtype)
    carried = state_VxK * jnp.exp(b_last_1xG)
    if lay.has_segments:
        carried = carried * vec["carry"]
    new_state = carried + mm(v_CxV, k_decayed, TN)
    state_ref[...] = new_state

    @pl.when(i == lay.num_chunks - 1)
    def _final():
        final_ref[...] = new_state


def segment_inputs(segment_ids, layout: chunking.Layout):
    """(reset count, in flag, out flag) as float32 rows [B, 1, NC, C], or () without segments."""
    if segment_ids is None:
        return ()
    return tuple(chunking.rows(x.astype(F32), layout) for x in chunking.segment_flags(segment_ids, layout))


def decay_input(log_decay, layout: chunking.Layout):
    """b: None (no decay), rows [B, H, NC, C] (scalar) or chunks of [B, H, Tp, K] (per channel)."""
    if log_decay is None:
        return None
    b = chunking.chunk_cumulative_decay(log_decay, layout)
    return b if layout.per_channel else chunking.rows(b, layout)


def inputs_and_specs(config: Config, q, k, v, b, s0, seg, reverse=False):
    lay = config.layout
    spec = block_specs(config, reverse)
    args = [q, k, v]
    specs = [spec["head"](lay.key_dim), spec["head"](lay.key_dim), spec["head"](lay.value_dim)]
    if lay.has_decay:
        args.append(b)
        specs.append(spec["head"](lay.key_dim) if lay.per_channel else spec["head_rows"])
    if config.has_initial_state and not reverse:
        args.append(s0)
        specs.append(spec["state"])
    if lay.has_segments:
        args += list(seg)
        specs += [spec["batch_rows"]] * 3
    return args, specs


def forward(config: Config, q, k, v, b, s0, seg, save_states: bool):
    """Kernel-level forward on [B, H, Tp, *] inputs -> (o, final state^T[, states^T per chunk])."""
    lay = config.layout
    spec = block_specs(config)
    args, in_specs = inputs_and_specs(config, q, k, v, b, s0, seg)
    scratch = [pltpu.VMEM((lay.value_dim, lay.key_dim), F32)] + gate_scratch(lay, backward=False)
    # The backward's state residual is stored in the matmul operand dtype (bf16 halves it).
    out_shape = chunking.forward_outputs(lay, v.dtype, save_states, (lay.value_dim, lay.key_dim),
                                         jnp.dtype(config.mxu_dtype))
    return pl.pallas_call(
        functools.partial(_forward_kernel, config, save_states),
        grid=(lay.batch, lay.heads, lay.num_chunks),
        in_specs=in_specs,
        out_specs=[spec["head"](lay.value_dim), spec["state"], spec["chunk_state"]][:len(out_shape)],
        out_shape=out_shape,
        scratch_shapes=scratch,
        compiler_params=compiler_params(),
        interpret=config.interpret,
        name="linear_attention_fwd",
    )(*args)


def _backward():
    from hybrax.pallas_kernels.linear_attention.tpu_backward import backward
    return backward


_chunked = chunking.with_own_backward(forward, _backward)


def linear_attention_kernel(q, k, v, log_decay, *, scale: float, initial_state, segment_ids,
                            return_final_state: bool, chunk_size: int, interpret=None):
    """The contract's signature plus `interpret` (None: compiled on a TPU, interpreted on a CPU, refused on a GPU)."""
    chunk_size = -(-chunk_size // 8) * 8  # a whole number of sublane tiles; same result, any chunk
    if interpret is None:
        interpret = interpret_mode("pallas_tpu linear_attention", "tpu")
    layout = chunking.make_layout(q, v, log_decay, segment_ids, chunk_size)
    low_precision = all(x.dtype == jnp.bfloat16 for x in (q, k, v))
    config = Config(layout, float(scale), initial_state is not None, interpret,
                    "bfloat16" if low_precision else "float32")
    s0 = None if initial_state is None else jnp.swapaxes(initial_state.astype(F32), 2, 3)
    seg = segment_inputs(segment_ids, layout)
    o, final = _chunked(config, chunking.to_heads(q, layout), chunking.to_heads(k, layout),
                        chunking.to_heads(v, layout), decay_input(log_decay, layout), s0, seg)
    return chunking.from_heads(o, layout), (jnp.swapaxes(final, 2, 3) if return_final_state else None)


def linear_attention(q: jax.Array, k: jax.Array, v: jax.Array, log_decay: jax.Array | None, *,
                     scale: float, initial_state: jax.Array | None, segment_ids: jax.Array | None,
                     return_final_state: bool, chunk_size: int) -> tuple[jax.Array, jax.Array | None]:
    """Pallas TPU linear attention: o [B, T, H, V] in v's dtype, final state [B, H, K, V] float32."""
    return linear_attention_kernel(q, k, v, log_decay, scale=scale, initial_state=initial_state,
                                   segment_ids=segment_ids, return_final_state=return_final_state,
                                   chunk_size=chunk_size)
