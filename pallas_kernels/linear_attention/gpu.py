"""Chunked linear attention as Pallas GPU kernels (Triton backend), forward and backward.

Same op and chunked form as tpu.py (Katharopoulos et al. 2020; RetNet; Lightning Attention; GLA,
Yang et al. 2024; Mamba-2 SSD):

    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,    o_t = scale * q_t S_t
    per chunk:  o = scale * (P v + (q * exp(b)) S),   S_new = diag(exp(b_C)) S + (k * exp(b_C - b))^T v

Backend: Pallas' Triton lowering, written with generic Pallas ops only (ref loads with `pl.ds`,
jnp arithmetic, `jnp.dot`, `lax.fori_loop`). Mosaic GPU is jax's future GPU path, but its kernels
are written for Hopper warpgroups (TMA, WGMMA, explicit shared-memory layouts) and could not be
checked in this CPU-only session; the Triton lowering covers every Ampere-and-later GPU and is
still shipped in jax 0.12. Triton wants power-of-two block shapes of at least 16 for `dot`: the
wrapper zero-pads K and V to such sizes (exact: padded channels carry zeros) and rounds chunk_size
up to one (the chunk only changes the order of float32 sums, not the result).

Grid (B, H, V / BV). State columns are independent, so each program owns a [K, BV] slice of the
state in registers and walks all chunks in a `fori_loop` (GPU grids have no sequential axis). The
intra-chunk scores P are recomputed per V block. Scalar/no decay: P = (q k^T) * exp(b_t - b_s) with
two dots. Per-channel decay: one query row per step, `P[t, :] = sum_k q_t k exp(b_t - b)` with
exponents <= 0 (no exp(-b) overflow). The forward saves the state entering every chunk for the
backward (gpu_backward.py). Dots take bfloat16 operands for bfloat16 inputs, else float32 operands
at IEEE precision (not TF32); accumulation is float32. Off GPU the kernels run in interpret mode.

Status: matches the float64 reference in interpret mode and lowers to Triton IR for an H100, but
has not run on a GPU. Parallelism is B * H * V/BV programs, each walking the sequence; a separate
chunk-parallel state pass (as in flash-linear-attention) would be needed for small batch * heads.
jax 0.12 warns that the Pallas Triton backend is deprecated.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from hybrax.pallas_kernels.implementation import interpret_mode
from hybrax.pallas_kernels.linear_attention import chunking

F32 = jnp.float32
MAX_VALUE_BLOCK = 64


@dataclasses.dataclass(frozen=True)
class Config:
    layout: chunking.Layout  # K and V here are the padded sizes
    scale: float
    value_block: int
    has_initial_state: bool
    interpret: bool
    mxu_dtype: str = "float32"  # "bfloat16" when q, k, v are: dots take bf16 operands

    def dot(self, x, y):
        """x @ y accumulated in float32: bf16 operands (tensor cores), or float32 ones at full
        IEEE precision (Triton's default for float32 would be TF32, ~1e-3 relative error)."""
        if self.mxu_dtype == "bfloat16":
            return jnp.dot(x.astype(jnp.bfloat16), y.astype(jnp.bfloat16), preferred_element_type=F32)
        return jnp.dot(x, y, precision=lax.Precision.HIGHEST, preferred_element_type=F32)

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

    def rows(self, name, width=None, start=0, size=None):
        size = self.config.layout.chunk if size is None else size
        ref = self.refs[name]
        head = 0 if ref.shape[1] == 1 else self.h  # per-batch arrays have a unit head axis
        cols = slice(None) if width is None else pl.ds(self.j * width, width)
        return ref[self.b, head, pl.ds(self.t0 + start, size), cols]

    def row_form(self, name):
        ref = self.refs[name]
        head = 0 if ref.shape[1] == 1 else self.h
        return ref[self.b, head, self.i]  # [1, C]


def chunk_terms(view: ChunkView):
    """Shared per-chunk quantities of forward and backward."""
    lay, bv = view.config.layout, view.config.value_block
    c = lay.chunk
    q = view.rows("q").astype(F32)
    k = view.rows("k").astype(F32)
    v = view.rows("v", bv).astype(F32)
    b = view.rows("b")
    b_last = view.rows("b", start=c - 1, size=1)
    q_weight = jnp.exp(b)
    k_weight = jnp.exp(b_last - b)
    count = carry = None
    if lay.has_segments:
        count = view.rows("count")
        in_flag = view.rows("in_flag")
        q_weight = q_weight * in_flag
        k_weight = k_weight * view.rows("out_flag")
        carry = view.rows("in_flag", start=c - 1, size=1)
    return dict(q=q, k=k, v=v, b=b, b_last=b_last, q_weight=q_weight, k_weight=k_weight,
                count=count, carry=carry)


def scalar_weights(view: ChunkView, terms):
    """[C, C] exp(b_t - b_s) on kept pairs (s <= t, same segment), 0 elsewhere."""
    c = view.config.layout.chunk
    t_idx = lax.broadcasted_iota(jnp.int32, (c, c), 0)
    s_idx = lax.broadcasted_iota(jnp.int32, (c, c), 1)
    keep = s_idx <= t_idx
    if terms["count"] is not None:
        keep = jnp.logical_and(keep, terms["count"] == view.row_form("count_row"))
    return jnp.exp(jnp.where(keep, terms["b"] - view.row_form("b_row"), -jnp.inf))


def row_weights(view: ChunkView, terms, t):
    """Per-channel decay, query row t: ([1, K] q_t, [C, K] exp(b_t - b_s) on kept key rows s)."""
    c = view.config.layout.chunk
    s_idx = lax.broadcasted_iota(jnp.int32, (c, 1), 0)
    keep = s_idx <= t
    if terms["count"] is not None:
        keep = jnp.logical_and(keep, terms["count"] == view.rows("count", start=t, size=1))
    b_t = view.rows("b", start=t, size=1)
    return view.rows("q", start=t, size=1).astype(F32), jnp.exp(jnp.where(keep, b_t - terms["b"], -jnp.inf))


def one_hot_row(c: int, t):
    return lax.broadcasted_iota(jnp.int32, (c, 1), 0) == t


def _forward_kernel(config: Config, names, *refs):
    lay, bv = config.layout, config.value_block
    refs = dict(zip(names, refs))
    c = lay.chunk
    b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    if config.has_initial_state:
        state0 = refs["s0"][b, h, :, pl.ds(j * bv, bv)]
    else:
        state0 = jnp.zeros((lay.key_dim, bv), F32)

    def chunk(i, state_KxBV):
        view = ChunkView(config, refs, (b, h, j), i)
        terms = chunk_terms(view)
        if "states" in refs:
            refs["states"][b, h, i, :, pl.ds(j * bv, bv)] = state_KxBV
        q, k, v = terms["q"], terms["k"], terms["v"]
        if lay.per_channel:
            def row(t, o_acc):
                q_t, e = row_weights(view, terms, t)
                p_col = jnp.sum(k * e * q_t, axis=1, keepdims=True)  # P[t, :] as a column [C, 1]
                o_row = jnp.sum(p_col * v, axis=0, keepdims=True)
                return o_acc + jnp.where(one_hot_row(c, t), o_row, 0.0)

            o_intra = lax.fori_loop(0, c, row, jnp.zeros((c, bv), F32))
        else:
            p = config.dot(q, k.T) * scalar_weights(view, terms)
            o_intra = config.dot(p, v)
        o_inter = config.dot(q * terms["q_weight"], state_KxBV)
        refs["o"][b, h, pl.ds(view.t0, c), pl.ds(j * bv, bv)] = (
            config.scale * (o_intra + o_inter)).astype(refs["o"].dtype)
        decay_last = jnp.exp(terms["b_last"])  # [1, G]
        carried = state_KxBV * (decay_last.T if lay.per_channel else decay_last)
        if terms["carry"] is not None:
            carried = carried * terms["carry"]
        return carried + config.dot((k * terms["k_weight"]).T, v)

    final = lax.fori_loop(0, lay.num_chunks, chunk, state0)
    refs["final"][b, h, :, pl.ds(j * bv, bv)] = final


def kernel_inputs(config: Config, q, k, v, b, s0, seg):
    """(names, arrays) of the kernels' common inputs, in call order."""
    names, args = ["q", "k", "v", "b"], [q, k, v, b]
    if not config.layout.per_channel:
        names.append("b_row")
        args.append(chunking.row_form(b, config.layout))
    if s0 is not None:
        names.append("s0")
        args.append(s0)
    if seg:
        names += ["count", "count_row", "in_flag", "out_flag"]
        args += list(seg)
    return names, args


def call_forward(config: Config, kernel, names, args, dtype, save_states: bool, name: str):
    """pallas_call of a chunk-walking forward kernel `kernel(config, names, *refs)` on grid
    (B, H, V / BV) -> (o [B, H, Tp, V] in `dtype`, final state [B, H, K, V][, states per chunk])."""
    lay = config.layout
    out_shape = chunking.forward_outputs(lay, dtype, save_states, (lay.key_dim, lay.value_dim))
    return pl.pallas_call(
        functools.partial(kernel, config, names + ["o", "final", "states"][:len(out_shape)]),
        grid=(lay.batch, lay.heads, config.num_value_blocks),
        out_shape=out_shape,
        compiler_params=compiler_params(),
        interpret=config.interpret,
        name=name,
    )(*args)


def forward(config: Config, q, k, v, b, s0, seg, save_states: bool):
    """Kernel-level forward on [B, H, Tp, *] inputs -> (o, final state[, states per chunk])."""
    names, args = kernel_inputs(config, q, k, v, b, s0, seg)
    return call_forward(config, _forward_kernel, names, args, v.dtype, save_states, "linear_attention_fwd")


def _backward():
    from hybrax.pallas_kernels.linear_attention.gpu_backward import backward
    return backward


_chunked = chunking.with_own_backward(forward, _backward)


def _pow2_at_least_16(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def pad_for_triton(q, k, v, initial_state, chunk_size: int):
    """Zero-pad K and V to powers of two >= 16 and round chunk_size up to one (Triton's dot blocks).
    Exact: padded channels carry zeros. -> (q, k, v, initial_state, chunk_size, K padding)."""
    key_dim, value_dim = q.shape[-1], v.shape[-1]
    kp, vp = _pow2_at_least_16(key_dim) - key_dim, _pow2_at_least_16(value_dim) - value_dim
    q, k, v = pad_last(q, kp), pad_last(k, kp), pad_last(v, vp)
    if initial_state is not None:
        initial_state = pad_last(jnp.pad(initial_state.astype(F32), ((0, 0), (0, 0), (0, kp), (0, 0))), vp)
    return q, k, v, initial_state, _pow2_at_least_16(chunk_size), kp


def pad_last(x, n: int):
    """x zero-padded by n along its last axis."""
    return x if x is None or n == 0 else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n)])


def make_config(config_type, layout: chunking.Layout, scale: float, q, k, v, initial_state, interpret):
    """A kernel Config: value blocks of at most MAX_VALUE_BLOCK, bf16 dot operands for bf16 q, k, v."""
    low_precision = all(x.dtype == jnp.bfloat16 for x in (q, k, v))
    return config_type(layout, float(scale), min(layout.value_dim, MAX_VALUE_BLOCK), initial_state is not None,
                       interpret, "bfloat16" if low_precision else "float32")


def segment_inputs(segment_ids, layout: chunking.Layout) -> tuple:
    """The kernels' segment arrays: (count, count in row form, in flags, out flags), or ()."""
    if segment_ids is None:
        return ()
    count, in_flag, out_flag = chunking.segment_flags(segment_ids, layout)
    return count, chunking.row_form(count, layout), in_flag, out_flag


def linear_attention_kernel(q, k, v, log_decay, *, scale: float, initial_state, segment_ids,
                            return_final_state: bool, chunk_size: int, interpret=None):
    """The contract's signature plus `interpret` (None: compiled on a GPU, interpreted on a CPU, refused on a TPU)."""
    if interpret is None:
        interpret = interpret_mode("pallas_gpu linear_attention", "gpu")
    key_dim, value_dim = q.shape[-1], v.shape[-1]
    q, k, v, initial_state, chunk_size, kp = pad_for_triton(q, k, v, initial_state, chunk_size)
    if log_decay is not None and log_decay.ndim == 4:
        log_decay = pad_last(log_decay, kp)
    layout = chunking.make_layout(q, v, log_decay, segment_ids, chunk_size)
    config = make_config(Config, layout, scale, q, k, v, initial_state, interpret)
    seg = segment_inputs(segment_ids, layout)
    o, final = _chunked(config, chunking.to_heads(q, layout), chunking.to_heads(k, layout),
                        chunking.to_heads(v, layout), chunking.chunk_cumulative_decay(log_decay, layout),
                        initial_state, seg)
    o = chunking.from_heads(o, layout)[..., :value_dim]
    return o, (final[:, :, :key_dim, :value_dim] if return_final_state else None)


def linear_attention(q: jax.Array, k: jax.Array, v: jax.Array, log_decay: jax.Array | None, *,
                     scale: float, initial_state: jax.Array | None, segment_ids: jax.Array | None,
                     return_final_state: bool, chunk_size: int) -> tuple[jax.Array, jax.Array | None]:
    """Pallas GPU linear attention: o [B, T, H, V] in v's dtype, final state [B, H, K, V] float32."""
    return linear_attention_kernel(q, k, v, log_decay, scale=scale, initial_state=initial_state,
                                   segment_ids=segment_ids, return_final_state=return_final_state,
                                   chunk_size=chunk_size)
