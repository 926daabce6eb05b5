"""Backward Pallas TPU kernel of the chunked mLSTM (forward and notation: tpu.py).

The per-chunk math is chunk_math.grads (shared with the GPU kernel). Walks the chunks in reverse
(index maps read chunk NC-1-i) carrying dC [K, V] and dn [1, K], the
gradients of the state leaving the chunk, in VMEM scratch; reads the state entering the chunk saved
by the forward and recomputes P, e, m and the outputs. Every stabiliser is a constant. With dh the
output's cotangent, G = dh / floor, g = -rowsum(G * num) / floor * sign(den) [|den| is the floor]:

    dA  = G v^T + g 1^T,  A = scale q k^T * P:   dq += scale (dA * P) k,  dk += scale (dA * P)^T q,  dv += A^T G
    inter terms (e_i scale q_i C, ...):          dq += e scale (G C^T + g n),   dC_in = (e scale q)^T G + f dC
                                                 dn_in = sum_i g_i e_i scale q_i + f dn
    state leaving (a_j = P[L, j], f = e_L):      dk += a (v dC^T + dn),  dv += a (k dC),
                                                 da_j = k_j dC v_j^T + k_j . dn,   df = <dC, C_in> + <dn, n_in>
    gates:  dw = dA * A (+ a * da on row L),   dz = rowsum(G * inter_num) + g inter_den (+ f df on row L)
            dli_j = sum_i dw_ij,   dlf_m = sum_{i >= m, same segment} (sum_{j < m} dw_ij + dz_i)
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from hybrax.pallas_kernels.mlstm import chunk_math
from hybrax.pallas_kernels.mlstm.tpu import (F32, Config, block_specs, chunk_weights, common_inputs,
                                             compiler_params, exact_dot, state_shapes)


def _backward_kernel(config: Config, *refs):
    lay = config.layout
    refs = list(refs)
    q_ref, k_ref, v_ref, li_ref, lf_ref = refs[:5]
    del refs[:5]
    segment_refs = [refs.pop(0) for _ in range(2)] if lay.has_segments else []
    (cs_ref, ns_ref, ms_ref, dh_ref, dcf_ref, dnf_ref, dq_ref, dk_ref, dv_ref, dli_ref, dlf_ref,
     dc0_ref, dn0_ref, dc_ref, dn_ref) = refs
    i = pl.program_id(2)
    chunk_index = lay.num_chunks - 1 - i

    @pl.when(i == 0)
    def _init():
        dc_ref[...] = dcf_ref[...]
        dn_ref[...] = dnf_ref[...]

    dc, dn = dc_ref[...], dn_ref[...]
    c_in, n_in, m_in = cs_ref[...].astype(F32), ns_ref[...], ms_ref[...]
    weights = chunk_weights(config, chunk_index, li_ref, lf_ref, segment_refs, m_in)
    q, k, v = (ref[...].astype(F32) for ref in (q_ref, k_ref, v_ref))
    out = chunk_math.outputs(config.scale, config.mm, q, k, v, weights, c_in, n_in)
    dh = dh_ref[...].astype(F32)
    delta = jnp.sum(dh * out["h"], axis=1, keepdims=True)
    dq, dk, dv, dli_row, dlf_row, new_dc, new_dn = chunk_math.grads(
        config.scale, config.mm, exact_dot, q, k, v, dh, delta, weights, out, c_in, n_in, dc, dn)
    dli_ref[pl.ds(chunk_index, 1), :] = dli_row
    dlf_ref[pl.ds(chunk_index, 1), :] = dlf_row
    dq_ref[...] = dq.astype(dq_ref.dtype)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
    dc_ref[...] = new_dc
    dn_ref[...] = new_dn

    @pl.when(i == lay.num_chunks - 1)
    def _first_chunk():
        dc0_ref[...] = new_dc
        dn0_ref[...] = new_dn


def backward(config: Config, q, k, v, li, lf, seg, states, dh, dc, dn):
    """Kernel-level backward on [B, H, Tp, *] arrays -> (dq, dk, dv, dli, dlf, dC0, dn0)."""
    lay = config.layout
    spec = block_specs(config, reverse=True)
    args, in_specs, seg_args, seg_specs = common_inputs(config, q, k, v, li, lf, seg, reverse=True)
    shapes = state_shapes(lay)
    args += seg_args + list(states) + [dh, dc, dn]
    in_specs += seg_specs + [spec["per_chunk"](*s) for s in shapes]
    in_specs += [spec["head"](lay.value_dim), spec["whole"](*shapes[0]), spec["whole"](*shapes[1])]
    bh = (lay.batch, lay.heads)
    head = lambda d, dtype: jax.ShapeDtypeStruct(bh + (lay.padded_len, d), dtype)
    out_shape = [head(lay.key_dim, q.dtype), head(lay.key_dim, k.dtype), head(lay.value_dim, v.dtype),
                 jax.ShapeDtypeStruct(li.shape, F32), jax.ShapeDtypeStruct(lf.shape, F32),
                 jax.ShapeDtypeStruct(bh + shapes[0], F32), jax.ShapeDtypeStruct(bh + shapes[1], F32)]
    out_specs = [spec["head"](lay.key_dim), spec["head"](lay.key_dim), spec["head"](lay.value_dim),
                 spec["head_rows"], spec["head_rows"], spec["whole"](*shapes[0]), spec["whole"](*shapes[1])]
    return tuple(pl.pallas_call(
        functools.partial(_backward_kernel, config),
        grid=(lay.batch, lay.heads, lay.num_chunks),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM(shapes[0], F32), pltpu.VMEM(shapes[1], F32)],
        compiler_params=compiler_params(),
        interpret=config.interpret,
        name="mlstm_bwd",
    )(*args))
