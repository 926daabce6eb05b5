"""The chunked gated delta rule as Pallas GPU kernels (Triton backend), forward and backward.

Same op and chunked WY / UT form as tpu.py (DeltaNet, Schlag et al. 2021 / Yang et al. 2024; Gated
DeltaNet's decay, Yang, Kautz & Hatamizadeh 2024); the per-chunk math is chunk_math.py, shared with
the TPU kernels. Backend: Pallas' Triton lowering with generic Pallas ops only (ref loads with
`pl.ds`, jnp arithmetic, `lax.dot_general`, `lax.fori_loop`), as linear_attention/gpu.py. Mosaic GPU
is jax's future GPU path, but its kernels are written for Hopper warpgroups and could not be
checked in a CPU-only session; Triton is what linear_attention's GPU kernel uses. Triton wants
power-of-two blocks of at least 16 for dots: the wrapper zero-pads K and V (exact: padded channels
carry zeros, and zero key channels leave k k^T unchanged) and rounds chunk_size up to one.

Grid (B, H, V / BV). The K x K structure lives only in A, (I + A)^{-1} and W, which do not depend
on v; X = U - W S, o and S_new are separable by value column. So each program owns a [K, BV] slice
of the state in registers and walks all chunks in a `fori_loop`, recomputing A, the inverse and W
per value block (the price of independence). The forward saves the state entering every chunk for
gpu_backward.py. Dots take bfloat16 operands for bfloat16 inputs (not those touching the inverse),
else float32 at IEEE precision (not TF32); accumulation is float32. Off GPU the kernels run in
interpret mode; on a TPU they refuse.

Status: matches the float64 reference in interpret mode and lowers to Triton IR for an H100, but
has not run on a GPU. Parallelism is B * H * V / BV programs each walking the sequence.
"""

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from hybrax.pallas_kernels.delta_rule import chunk_math, chunking
from hybrax.pallas_kernels.implementation import interpret_mode
from hybrax.pallas_kernels.linear_attention import chunking as la_chunking
from hybrax.pallas_kernels.linear_attention import gpu as la_gpu
from hybrax.pallas_kernels.linear_attention.gpu import ChunkView

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Config(la_gpu.Config):
    """linear_attention's kernel config, plus the chunk math's matmul."""

    def mm(self, x, y, dims=chunk_math.NN):
        return chunk_math.dot(x, y, dims, operand_dtype=self.mxu_dtype)


compiler_params = la_gpu.compiler_params


def load_chunk(config: Config, view: ChunkView):
    """chunk_math.chunk_terms of chunk view.i for the program's value block."""
    c = config.layout.chunk
    seg = config.layout.has_segments
    return chunk_math.chunk_terms(
        config.mm, view.rows("q").astype(F32), view.rows("k").astype(F32),
        view.rows("v", config.value_block).astype(F32), view.rows("beta"), view.rows("b"),
        view.row_form("b_row"), view.rows("b", start=c - 1, size=1),
        view.rows("count") if seg else None, view.row_form("count_row") if seg else None,
        view.rows("in_flag") if seg else None, view.rows("out_flag") if seg else None,
        view.rows("in_flag", start=c - 1, size=1) if seg else None)


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
        if "states" in refs:
            refs["states"][b, h, i, :, pl.ds(j * bv, bv)] = state_KxBV
        o, new_state = chunk_math.forward_chunk(config.mm, load_chunk(config, view), state_KxBV, config.scale)
        refs["o"][b, h, pl.ds(view.t0, c), pl.ds(j * bv, bv)] = o.astype(refs["o"].dtype)
        return new_state

    refs["final"][b, h, :, pl.ds(j * bv, bv)] = lax.fori_loop(0, lay.num_chunks, chunk, state0)


def kernel_inputs(config: Config, q, k, v, beta, b, s0, seg):
    """(names, arrays) of the kernels' common inputs, in call order."""
    names = ["q", "k", "v", "beta", "b", "b_row"]
    args = [q, k, v, beta, b, la_chunking.row_form(b, config.layout)]
    if s0 is not None:
        names.append("s0")
        args.append(s0)
    if seg:
        names += ["count", "count_row", "in_flag", "out_flag"]
        args += list(seg)
    return names, args


def forward(config: Config, q, k, v, beta, b, s0, seg, save_states: bool):
    """Kernel-level forward on [B, H, Tp, *] inputs -> (o, final state[, states per chunk])."""
    names, args = kernel_inputs(config, q, k, v, beta, b, s0, seg)
    return la_gpu.call_forward(config, _forward_kernel, names, args, v.dtype, save_states, "delta_rule_fwd")


def _backward():
    from hybrax.pallas_kernels.delta_rule.gpu_backward import backward
    return backward


_chunked = chunking.with_own_backward(forward, _backward)


def delta_rule_kernel(q, k, v, beta, log_decay, *, scale: float, initial_state, segment_ids,
                      return_final_state: bool, chunk_size: int, interpret=None):
    """The contract's signature plus `interpret` (None: compiled on a GPU, interpreted on a CPU, refused on a TPU)."""
    if interpret is None:
        interpret = interpret_mode("pallas_gpu delta_rule", "gpu")
    if q.shape[1] == 0:
        raise NotImplementedError("pallas_gpu delta_rule: empty sequence (T = 0)")
    key_dim, value_dim = q.shape[-1], v.shape[-1]
    q, k, v, initial_state, chunk_size, _ = la_gpu.pad_for_triton(q, k, v, initial_state, chunk_size)
    layout = chunking.make_layout(q, v, log_decay, segment_ids, chunk_size)
    config = la_gpu.make_config(Config, layout, scale, q, k, v, initial_state, interpret)
    seg = la_gpu.segment_inputs(segment_ids, layout)
    heads = lambda x: la_chunking.to_heads(x, layout)
    o, final = _chunked(config, heads(q), heads(k), heads(v), chunking.beta_heads(beta, layout),
                        la_chunking.chunk_cumulative_decay(log_decay, layout), initial_state, seg)
    o = la_chunking.from_heads(o, layout)[..., :value_dim]
    return o, (final[:, :, :key_dim, :value_dim] if return_final_state else None)


def delta_rule(q: jax.Array, k: jax.Array, v: jax.Array, beta: jax.Array, log_decay: jax.Array | None, *,
               scale: float, initial_state: jax.Array | None, segment_ids: jax.Array | None,
               return_final_state: bool, chunk_size: int) -> tuple[jax.Array, jax.Array | None]:
    """Pallas GPU delta rule: o [B, T, H, V] in v's dtype, final state [B, H, K, V] float32."""
    return delta_rule_kernel(q, k, v, beta, log_decay, scale=scale, initial_state=initial_state,
                             segment_ids=segment_ids, return_final_state=return_final_state,
                             chunk_size=chunk_size)
