"""Backward Pallas TPU kernel of chunked linear attention (see tpu.py for the forward).

Walks the chunks in reverse (the grid's chunk axis is sequential; index maps read chunk NC-1-i),
carrying dS^T [V, K] (the gradient of the state leaving the chunk) in VMEM scratch. With S the
state entering the chunk (saved by the forward), qd = q * exp(b) * in, kd = k * exp(b_C - b) * out,
dP = scale * do v^T masked like P, and E the decay weights of P:

    dv    = scale * P^T do + kd dS_new
    dq    = dP-part + scale * (do S^T) * exp(b) * in            (dP-part: sum_s dP[t,s] k_s E_ts)
    dk    = dP-part + (v dS_new^T) * exp(b_C - b) * out       (dP-part: sum_t dP[t,s] q_t E_ts)
    db    = q dq_P - k dk_P + dqd * qd - dkd * kd,   db_C += sum_t dkd * kd + exp(b_C) rowsum(S dS_new)
    dS    = scale * qd^T do + carry * diag(exp(b_C)) dS_new

db is the gradient of the within-chunk cumulative decay; JAX maps it back to log_decay through the
cumsum in chunking.py. For scalar decay the per-channel terms are summed over K.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from hybrax.pallas_kernels.linear_attention import tpu_gates
from hybrax.pallas_kernels.linear_attention.tpu import (Config, block_specs, compiler_params, fill_gate_refs,
                                                 gate_scratch, gate_scratch_names, inputs_and_specs)
from hybrax.pallas_kernels.linear_attention.tpu_chunk import (F32, NT, TN, chunk_vectors, dot, pair_keep,
                                                        scalar_decay_weights, sum_to, to_row)


def _backward_kernel(config: Config, *refs):
    lay = config.layout
    c, scale = lay.chunk, config.scale
    refs = list(refs)
    q_ref, k_ref, v_ref = refs[:3]
    del refs[:3]
    b_ref = refs.pop(0) if lay.has_decay else None
    segment_refs = [refs.pop(0) for _ in range(3)] if lay.has_segments else []
    states_ref, do_ref, dfinal_ref, dq_ref, dk_ref, dv_ref = refs[:6]
    del refs[:6]
    db_ref = refs.pop(0) if lay.has_decay else None
    ds0_ref, dstate_ref = refs[:2]
    i = pl.program_id(2)
    mm = functools.partial(dot, operand_dtype=jnp.dtype(config.mxu_dtype))

    @pl.when(i == 0)
    def _init():
        dstate_ref[...] = dfinal_ref[...]

    dstate_VxK = dstate_ref[...]
    state_VxK = states_ref[...].astype(F32)
    q_CxK = q_ref[...].astype(F32)
    k_CxK = k_ref[...].astype(F32)
    v_CxV = v_ref[...].astype(F32)
    do_CxV = do_ref[...].astype(F32)
    chunk_index = lay.num_chunks - 1 - i
    vec = chunk_vectors(lay, chunk_index, b_ref, segment_refs)
    b_CxG = vec["b"]
    b_last_1xG = b_CxG[c - 1:c, :]
    q_weight = jnp.exp(b_CxG)
    k_weight = jnp.exp(b_last_1xG - b_CxG)
    if lay.has_segments:
        q_weight = q_weight * vec["in_col"]
        k_weight = k_weight * vec["out_col"]
    q_decayed = q_CxK * q_weight
    k_decayed = k_CxK * k_weight

    if lay.per_channel:
        gate_refs = dict(zip(gate_scratch_names(lay, backward=True), refs[2:]))
        fill_gate_refs(gate_refs, b_ref, vec, q=q_CxK, k=k_CxK, v=v_CxV, do=do_CxV)
        dq_p, dk_p, dv_p = tpu_gates.score_grads(gate_refs, q_CxK, k_CxK, v_CxV, do_CxV, b_CxG,
                                                 vec["count_col"], vec["count_row"], scale, c, mm)
    else:
        keep = pair_keep(c, vec["count_col"], vec["count_row"])
        weights = scalar_decay_weights(b_CxG, vec["b_row"], keep)
        p_CxC = mm(q_CxK, k_CxK, NT) * weights
        dp_weighted = scale * mm(do_CxV, v_CxV, NT) * weights
        dq_p = mm(dp_weighted, k_CxK)
        dk_p = mm(dp_weighted, q_CxK, TN)
        dv_p = scale * mm(p_CxC, do_CxV, TN)

    dq_decayed = scale * mm(do_CxV, state_VxK)
    dk_decayed = mm(v_CxV, dstate_VxK)
    dq_ref[...] = (dq_p + dq_decayed * q_weight).astype(dq_ref.dtype)
    dk_ref[...] = (dk_p + dk_decayed * k_weight).astype(dk_ref.dtype)
    dv_ref[...] = (dv_p + mm(k_decayed, dstate_VxK, NT)).astype(dv_ref.dtype)

    decay_last = jnp.exp(b_last_1xG)
    if db_ref is not None:
        k_term = dk_decayed * k_decayed
        carry_term = decay_last * jnp.sum(state_VxK * dstate_VxK, axis=0, keepdims=True)  # [1, K]
        if lay.has_segments:  # the carried state's decay matters only if the state survives
            carry_term = carry_term * vec["carry"]
        d_last = sum_to(jnp.sum(k_term, axis=0, keepdims=True) + carry_term, lay.decay_dim)
        db = sum_to(q_CxK * dq_p - k_CxK * dk_p + dq_decayed * q_decayed - k_term, lay.decay_dim)
        row = jax.lax.broadcasted_iota(jnp.int32, db.shape, 0)
        db = db + jnp.where(row == c - 1, d_last, 0.0)
        if lay.per_channel:
            db_ref[...] = db
        else:
            db_ref[pl.ds(chunk_index, 1), :] = to_row(db)

    carried = dstate_VxK * decay_last
    if lay.has_segments:
        carried = carried * vec["carry"]
    new_dstate = scale * mm(do_CxV, q_decayed, TN) + carried
    dstate_ref[...] = new_dstate

    @pl.when(i == lay.num_chunks - 1)
    def _first_chunk():
        ds0_ref[...] = new_dstate


def backward(config: Config, q, k, v, b, seg, states, d_o, d_final):
    """Kernel-level backward on [B, H, Tp, *] arrays -> (dq, dk, dv, db, d initial state^T)."""
    lay = config.layout
    spec = block_specs(config, reverse=True)
    args, in_specs = inputs_and_specs(config, q, k, v, b, None, seg, reverse=True)
    args += [states, d_o, d_final]
    in_specs += [spec["chunk_state"], spec["head"](lay.value_dim), spec["state"]]
    scratch = [pltpu.VMEM((lay.value_dim, lay.key_dim), F32)] + gate_scratch(lay, backward=True)
    head = lambda d, dtype: jax.ShapeDtypeStruct((lay.batch, lay.heads, lay.padded_len, d), dtype)
    out_shape = [head(lay.key_dim, q.dtype), head(lay.key_dim, k.dtype), head(lay.value_dim, v.dtype)]
    out_specs = [spec["head"](lay.key_dim), spec["head"](lay.key_dim), spec["head"](lay.value_dim)]
    if lay.has_decay:
        out_shape.append(jax.ShapeDtypeStruct(b.shape, F32))
        out_specs.append(spec["head"](lay.key_dim) if lay.per_channel else spec["head_rows"])
    out_shape.append(jax.ShapeDtypeStruct((lay.batch, lay.heads, lay.value_dim, lay.key_dim), F32))
    out_specs.append(spec["state"])
    grads = pl.pallas_call(
        functools.partial(_backward_kernel, config),
        grid=(lay.batch, lay.heads, lay.num_chunks),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=scratch,
        compiler_params=compiler_params(),
        interpret=config.interpret,
        name="linear_attention_bwd",
    )(*args)
    grads = list(grads)
    if not lay.has_decay:
        grads.insert(3, None)
    return tuple(grads)
