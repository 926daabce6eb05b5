"""Backward Pallas TPU kernel of the chunked gated delta rule (forward: tpu.py).

Walks the chunks in reverse (the grid's chunk axis is sequential; index maps read chunk NC-1-i),
carrying dS [K, V] (the gradient of the state leaving the chunk) in VMEM scratch. Per chunk it
reads the state entering the chunk (the forward's residual), recomputes A, (I + A)^{-1}, W, U and
X = U - W S, and applies chunk_math.backward_chunk (the derivation is in its docstring; the inverse's
gradient is d(M^-1) = -M^-1 dM M^-1, folded into dA = -strict_lower(T^T [dW dU] [W U]^T)).

dq, dk, dv come out per chunk in the inputs' dtypes; dbeta and db (the gradient of the within-chunk
cumulative decay; JAX maps it back through the cumsum) as float32 [NC, C] rows per head, resident
for the whole walk; d initial state after the first chunk.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from hybrax.pallas_kernels.delta_rule import chunk_math
from hybrax.pallas_kernels.delta_rule.tpu import (F32, Config, block_specs, compiler_params, inputs_and_specs,
                                                  load_chunk, split_refs)


def _to_row(col_Cx1):
    c = col_Cx1.shape[0]
    eye = chunk_math.iota(c, 0) == chunk_math.iota(c, 1)
    return jnp.sum(jnp.where(eye, col_Cx1, 0.0), axis=0, keepdims=True)


def _backward_kernel(config: Config, *refs):
    lay = config.layout
    q_ref, k_ref, v_ref, beta_ref, b_ref, _, segment_refs, refs = split_refs(config, refs, reverse=True)
    states_ref, do_ref, dfinal_ref, dq_ref, dk_ref, dv_ref, dbeta_ref = refs[:7]
    del refs[:7]
    db_ref = refs.pop(0) if lay.has_decay else None
    ds0_ref, dstate_ref = refs[:2]
    i = pl.program_id(2)
    chunk_index = lay.num_chunks - 1 - i

    @pl.when(i == 0)
    def _init():
        dstate_ref[...] = dfinal_ref[...]

    terms = load_chunk(config, chunk_index, q_ref, k_ref, v_ref, beta_ref, b_ref, segment_refs)
    grads = chunk_math.backward_chunk(config.mm, terms, states_ref[...], dstate_ref[...],
                                      do_ref[...].astype(F32), config.scale)
    dq_ref[...] = grads["dq"].astype(dq_ref.dtype)
    dk_ref[...] = grads["dk"].astype(dk_ref.dtype)
    dv_ref[...] = grads["dv"].astype(dv_ref.dtype)
    dbeta_ref[pl.ds(chunk_index, 1), :] = _to_row(grads["dbeta"])
    if db_ref is not None:
        db_ref[pl.ds(chunk_index, 1), :] = _to_row(grads["db"])
    dstate_ref[...] = grads["d_state"]

    @pl.when(i == lay.num_chunks - 1)
    def _first_chunk():
        ds0_ref[...] = grads["d_state"]


def backward(config: Config, q, k, v, beta, b, seg, states, d_o, d_final):
    """Kernel-level backward -> (dq, dk, dv, dbeta rows, db rows or None, d initial state)."""
    lay = config.layout
    spec = block_specs(config, reverse=True)
    args, in_specs = inputs_and_specs(config, q, k, v, beta, b, None, seg, reverse=True)
    args += [states, d_o, d_final]
    in_specs += [spec["chunk_state"], spec["head"](lay.value_dim), spec["state"]]
    head = lambda d, dtype: jax.ShapeDtypeStruct((lay.batch, lay.heads, lay.padded_len, d), dtype)
    out_shape = [head(lay.key_dim, q.dtype), head(lay.key_dim, k.dtype), head(lay.value_dim, v.dtype),
                 jax.ShapeDtypeStruct(beta.shape, F32)]
    out_specs = [spec["head"](lay.key_dim), spec["head"](lay.key_dim), spec["head"](lay.value_dim),
                 spec["head_rows"]]
    if lay.has_decay:
        out_shape.append(jax.ShapeDtypeStruct(b.shape, F32))
        out_specs.append(spec["head_rows"])
    out_shape.append(jax.ShapeDtypeStruct((lay.batch, lay.heads, lay.key_dim, lay.value_dim), F32))
    out_specs.append(spec["state"])
    grads = list(pl.pallas_call(
        functools.partial(_backward_kernel, config),
        grid=(lay.batch, lay.heads, lay.num_chunks),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((lay.key_dim, lay.value_dim), F32)],
        compiler_params=compiler_params(),
        interpret=config.interpret,
        name="delta_rule_bwd",
    )(*args))
    if not lay.has_decay:
        grads.insert(4, None)
    return tuple(grads)
