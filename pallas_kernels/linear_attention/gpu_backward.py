"""Backward Pallas GPU (Triton) kernel of chunked linear attention (forward: gpu.py).

Grid (B, H, V / BV); each program walks the chunks in reverse carrying its [K, BV] slice of dS
(the gradient of the state leaving the chunk) and reads the state entering the chunk saved by the
forward. The formulas are those of tpu_backward.py. dv and dS are exact per value block; dq, dk and
db are sums over value blocks, so each program writes its partial and the wrapper adds them.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from hybrax.pallas_kernels.linear_attention.gpu import (F32, ChunkView, Config, chunk_terms, compiler_params,
                                                 kernel_inputs, one_hot_row, row_weights, scalar_weights)


def _backward_kernel(config: Config, names, *refs):
    lay, bv, scale = config.layout, config.value_block, config.scale
    refs = dict(zip(names, refs))
    c, _dot = lay.chunk, config.dot
    b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)

    def store_partial(name, rows, value):  # partial-sum outputs [NV, B, H, Tp, *]
        refs[name][j, b, h, rows, :] = value

    def chunk(n, dstate_KxBV):
        i = lay.num_chunks - 1 - n
        view = ChunkView(config, refs, (b, h, j), i)
        terms = chunk_terms(view)
        q, k, v = terms["q"], terms["k"], terms["v"]
        do = view.rows("do", bv).astype(F32)
        state_KxBV = refs["states"][b, h, i, :, pl.ds(j * bv, bv)]
        q_decayed = q * terms["q_weight"]
        k_decayed = k * terms["k_weight"]
        if lay.per_channel:
            def row(t, acc):
                dq_acc, dk_acc, dv_acc = acc
                q_t, e = row_weights(view, terms, t)
                do_t = view.rows("do", bv, start=t, size=1).astype(F32)
                ke = k * e
                p_col = jnp.sum(ke * q_t, axis=1, keepdims=True)  # P[t, s] over s, [C, 1]
                dp_col = scale * jnp.sum(v * do_t, axis=1, keepdims=True)  # dP[t, s] over s
                dq_row = jnp.sum(dp_col * ke, axis=0, keepdims=True)
                return (dq_acc + jnp.where(one_hot_row(c, t), dq_row, 0.0),
                        dk_acc + dp_col * q_t * e,
                        dv_acc + scale * p_col * do_t)

            zeros = lambda d: jnp.zeros((c, d), F32)
            dq_p, dk_p, dv_p = lax.fori_loop(0, c, row, (zeros(lay.key_dim), zeros(lay.key_dim), zeros(bv)))
        else:
            weights = scalar_weights(view, terms)
            p = _dot(q, k.T) * weights
            dp = scale * _dot(do, v.T) * weights
            dq_p, dk_p, dv_p = _dot(dp, k), _dot(dp.T, q), scale * _dot(p.T, do)
        dq_decayed = scale * _dot(do, state_KxBV.T)
        dk_decayed = _dot(v, dstate_KxBV.T)
        rows = pl.ds(view.t0, c)
        store_partial("dq", rows, dq_p + dq_decayed * terms["q_weight"])
        store_partial("dk", rows, dk_p + dk_decayed * terms["k_weight"])
        dv = dv_p + _dot(k_decayed, dstate_KxBV)
        refs["dv"][b, h, rows, pl.ds(j * bv, bv)] = dv.astype(refs["dv"].dtype)

        k_term = dk_decayed * k_decayed
        decay_last = jnp.exp(terms["b_last"])  # [1, G]
        carry_term = decay_last * jnp.sum(state_KxBV * dstate_KxBV, axis=1, keepdims=True).T  # [1, K]
        if terms["carry"] is not None:
            carry_term = carry_term * terms["carry"]
        d_last = jnp.sum(k_term, axis=0, keepdims=True) + carry_term
        db = q * dq_p - k * dk_p + dq_decayed * q_decayed - k_term
        if not lay.per_channel:
            d_last = jnp.sum(d_last, axis=1, keepdims=True)
            db = jnp.sum(db, axis=1, keepdims=True)
        store_partial("db", rows, db + jnp.where(one_hot_row(c, c - 1), d_last, 0.0))

        carried = dstate_KxBV * (decay_last.T if lay.per_channel else decay_last)
        if terms["carry"] is not None:
            carried = carried * terms["carry"]
        return scale * _dot(q_decayed.T, do) + carried

    dstate0 = refs["dfinal"][b, h, :, pl.ds(j * bv, bv)]
    refs["ds0"][b, h, :, pl.ds(j * bv, bv)] = lax.fori_loop(0, lay.num_chunks, chunk, dstate0)


def backward(config: Config, q, k, v, b, seg, states, d_o, d_final):
    """Kernel-level backward on [B, H, Tp, *] arrays -> (dq, dk, dv, db, d initial state)."""
    lay = config.layout
    names, args = kernel_inputs(config, q, k, v, b, None, seg)
    names += ["states", "do", "dfinal", "dq", "dk", "dv", "db", "ds0"]
    args += [states, d_o, d_final]
    partial = lambda d: jax.ShapeDtypeStruct(
        (config.num_value_blocks, lay.batch, lay.heads, lay.padded_len, d), F32)
    out_shape = [partial(lay.key_dim), partial(lay.key_dim),
                 jax.ShapeDtypeStruct((lay.batch, lay.heads, lay.padded_len, lay.value_dim), v.dtype),
                 partial(lay.decay_dim),
                 jax.ShapeDtypeStruct((lay.batch, lay.heads, lay.key_dim, lay.value_dim), F32)]
    dq, dk, dv, db, ds0 = pl.pallas_call(
        functools.partial(_backward_kernel, config, names),
        grid=(lay.batch, lay.heads, config.num_value_blocks),
        out_shape=out_shape,
        compiler_params=compiler_params(),
        interpret=config.interpret,
        name="linear_attention_bwd",
    )(*args)
    return (dq.sum(0).astype(q.dtype), dk.sum(0).astype(k.dtype), dv, db.sum(0), ds0)
