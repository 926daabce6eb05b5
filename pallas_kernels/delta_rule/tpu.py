"""The chunked gated delta rule as Pallas Mosaic TPU kernels, forward and backward (custom_vjp).

    S_t = exp(g_t) (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t,    o_t = scale * q_t S_t

DeltaNet (Schlag et al. 2021; chunked training: Yang et al. 2024) with Gated DeltaNet's decay (Yang,
Kautz & Hatamizadeh 2024). q, k [B, T, H, K], v [B, T, H, V], beta [B, T, H], g = log_decay None /
[B, T, H] (<= 0), state [B, H, K, V] float32. Per chunk, the WY / UT form of chunk_math.py: A on the
MXU, (I + A)^{-1} by recursive doubling in full C x C matmuls (chunk_math.unit_lower_inverse says
why not forward substitution), W, U, X = U - W S, o, S_new.

Grid (B, H, chunks); the chunk axis is sequential ("arbitrary") and carries the state [K, V] in a
VMEM scratch. Per-token scalars (b, beta, segment counts and flags) travel as [NC, C] rows (a [T, 1]
column would be padded 128x by the (8, 128) tiling); the kernel holds a head's rows and reads row
i (linear_attention/tpu_chunk.chunk_vectors). When a backward follows, the forward also writes the
state entering every chunk ([B, H, NC, K, V] float32: X = U - W S is a difference, so the state is
not rounded to bf16) as its residual; tpu_backward.py walks the chunks in reverse carrying dS and
recomputes the per-chunk quantities.

Precision: accumulation in float32; the q / k / state / X products take bfloat16 operands when q,
k and v are bfloat16; the inverse, W, U and their gradients always run in float32. chunk_size is
rounded up to a multiple of 8 (the sublane tile): the chunk changes the order of float32 sums,
not the result. Off TPU the kernels run in Pallas interpret mode; on a GPU they refuse.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from hybrax.pallas_kernels.delta_rule import chunk_math, chunking
from hybrax.pallas_kernels.implementation import interpret_mode
from hybrax.pallas_kernels.linear_attention import chunking as la_chunking
from hybrax.pallas_kernels.linear_attention import tpu as la_tpu
from hybrax.pallas_kernels.linear_attention.tpu_chunk import chunk_vectors, to_column

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Config(la_tpu.Config):
    """linear_attention's kernel config, plus the chunk math's matmul."""

    def mm(self, x, y, dims=chunk_math.NN):
        return chunk_math.dot(x, y, dims, operand_dtype=self.mxu_dtype)


def block_specs(config: Config, reverse: bool = False):
    """linear_attention's BlockSpec factories with the state held [K, V]."""
    return la_tpu.block_specs(config, reverse, state_dims=(config.layout.key_dim, config.layout.value_dim))


compiler_params = la_tpu.compiler_params


def load_chunk(config: Config, chunk_index, q_ref, k_ref, v_ref, beta_ref, b_ref, segment_refs):
    """chunk_math.chunk_terms of the chunk whose blocks the refs hold."""
    lay = config.layout
    c = lay.chunk
    vec = chunk_vectors(lay, chunk_index, b_ref, segment_refs)
    b = vec["b"]
    beta = to_column(beta_ref[pl.ds(chunk_index, 1), :])
    return chunk_math.chunk_terms(
        config.mm, q_ref[...].astype(F32), k_ref[...].astype(F32), v_ref[...].astype(F32), beta, b,
        vec["b_row"], b[c - 1:c, :], vec["count_col"], vec["count_row"], vec["in_col"], vec["out_col"],
        vec["carry"])


def split_refs(config: Config, refs, reverse=False):
    """(q, k, v, beta, b or None, s0 or None, segment refs, the rest) in the order of inputs_and_specs."""
    refs = list(refs)
    q_ref, k_ref, v_ref, beta_ref = refs[:4]
    del refs[:4]
    b_ref = refs.pop(0) if config.layout.has_decay else None
    s0_ref = refs.pop(0) if config.has_initial_state and not reverse else None
    segment_refs = [refs.pop(0) for _ in range(3)] if config.layout.has_segments else []
    return q_ref, k_ref, v_ref, beta_ref, b_ref, s0_ref, segment_refs, refs


def _forward_kernel(config: Config, save_states: bool, *refs):
    lay = config.layout
    q_ref, k_ref, v_ref, beta_ref, b_ref, s0_ref, segment_refs, refs = split_refs(config, refs)
    o_ref, final_ref = refs[:2]
    states_ref = refs[2] if save_states else None
    state_ref = refs[-1]
    i = pl.program_id(2)

    @pl.when(i == 0)
    def _init():
        state_ref[...] = s0_ref[...] if s0_ref is not None else jnp.zeros(state_ref.shape, F32)

    state = state_ref[...]
    if states_ref is not None:
        states_ref[...] = state
    terms = load_chunk(config, i, q_ref, k_ref, v_ref, beta_ref, b_ref, segment_refs)
    o, new_state = chunk_math.forward_chunk(config.mm, terms, state, config.scale)
    o_ref[...] = o.astype(o_ref.dtype)
    state_ref[...] = new_state

    @pl.when(i == lay.num_chunks - 1)
    def _final():
        final_ref[...] = new_state


def inputs_and_specs(config: Config, q, k, v, beta, b, s0, seg, reverse=False):
    lay = config.layout
    spec = block_specs(config, reverse)
    args = [q, k, v, beta]
    specs = [spec["head"](lay.key_dim), spec["head"](lay.key_dim), spec["head"](lay.value_dim),
             spec["head_rows"]]
    if lay.has_decay:
        args.append(b)
        specs.append(spec["head_rows"])
    if config.has_initial_state and not reverse:
        args.append(s0)
        specs.append(spec["state"])
    if lay.has_segments:
        args += list(seg)
        specs += [spec["batch_rows"]] * 3
    return args, specs


def forward(config: Config, q, k, v, beta, b, s0, seg, save_states: bool):
    """Kernel-level forward on [B, H, Tp, *] / [B, H, NC, C] inputs -> (o, final[, states per chunk])."""
    lay = config.layout
    spec = block_specs(config)
    args, in_specs = inputs_and_specs(config, q, k, v, beta, b, s0, seg)
    out_shape = la_chunking.forward_outputs(lay, v.dtype, save_states, (lay.key_dim, lay.value_dim))
    return pl.pallas_call(
        functools.partial(_forward_kernel, config, save_states),
        grid=(lay.batch, lay.heads, lay.num_chunks),
        in_specs=in_specs,
        out_specs=[spec["head"](lay.value_dim), spec["state"], spec["chunk_state"]][:len(out_shape)],
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((lay.key_dim, lay.value_dim), F32)],
        compiler_params=compiler_params(),
        interpret=config.interpret,
        name="delta_rule_fwd",
    )(*args)


def _backward():
    from hybrax.pallas_kernels.delta_rule.tpu_backward import backward
    return backward


_chunked = chunking.with_own_backward(forward, _backward)


def delta_rule_kernel(q, k, v, beta, log_decay, *, scale: float, initial_state, segment_ids,
                      return_final_state: bool, chunk_size: int, interpret=None):
    """The contract's signature plus `interpret` (None: compiled on a TPU, interpreted on a CPU, refused on a GPU)."""
    if interpret is None:
        interpret = interpret_mode("pallas_tpu delta_rule", "tpu")
    if q.shape[1] == 0:
        raise NotImplementedError("pallas_tpu delta_rule: empty sequence (T = 0)")
    chunk_size = -(-chunk_size // 8) * 8  # a whole number of sublane tiles; same result, any chunk
    layout = chunking.make_layout(q, v, log_decay, segment_ids, chunk_size)
    low_precision = all(x.dtype == jnp.bfloat16 for x in (q, k, v))
    config = Config(layout, float(scale), initial_state is not None, interpret,
                    "bfloat16" if low_precision else "float32")
    rows = lambda x: la_chunking.rows(x, layout)
    b = None if log_decay is None else rows(la_chunking.chunk_cumulative_decay(log_decay, layout))
    seg = () if segment_ids is None else tuple(
        rows(x.astype(F32)) for x in la_chunking.segment_flags(segment_ids, layout))
    s0 = None if initial_state is None else initial_state.astype(F32)
    o, final = _chunked(config, la_chunking.to_heads(q, layout), la_chunking.to_heads(k, layout),
                        la_chunking.to_heads(v, layout), rows(chunking.beta_heads(beta, layout)), b, s0, seg)
    return la_chunking.from_heads(o, layout), (final if return_final_state else None)


def delta_rule(q: jax.Array, k: jax.Array, v: jax.Array, beta: jax.Array, log_decay: jax.Array | None, *,
               scale: float, initial_state: jax.Array | None, segment_ids: jax.Array | None,
               return_final_state: bool, chunk_size: int) -> tuple[jax.Array, jax.Array | None]:
    """Pallas TPU delta rule: o [B, T, H, V] in v's dtype, final state [B, H, K, V] float32."""
    return delta_rule_kernel(q, k, v, beta, log_decay, scale=scale, initial_state=initial_state,
                             segment_ids=segment_ids, return_final_state=return_final_state,
                             chunk_size=chunk_size)
