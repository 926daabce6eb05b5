"""Backward Pallas GPU (Triton) kernel of the chunked gated delta rule (forward: gpu.py).

Grid (B, H, V / BV); each program walks the chunks in reverse carrying its [K, BV] slice of dS (the
gradient of the state leaving the chunk), reads the state entering the chunk saved by the forward,
recomputes the chunk's A, (I + A)^{-1}, W, U, X and applies chunk_math.backward_chunk. dv and dS are
exact per value block; dq, dk, dbeta and db are sums over value columns (dA, dP and the rest are
linear in the block's dX), so each program writes its partial and the wrapper adds them.
"""

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl

from hybrax.pallas_kernels.delta_rule import chunk_math
from hybrax.pallas_kernels.delta_rule.gpu import F32, ChunkView, Config, compiler_params, kernel_inputs, load_chunk


def _backward_kernel(config: Config, names, *refs):
    lay, bv = config.layout, config.value_block
    refs = dict(zip(names, refs))
    c = lay.chunk
    b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)

    def chunk(n, dstate_KxBV):
        i = lay.num_chunks - 1 - n
        view = ChunkView(config, refs, (b, h, j), i)
        state_KxBV = refs["states"][b, h, i, :, pl.ds(j * bv, bv)]
        d_o = view.rows("do", bv).astype(F32)
        grads = chunk_math.backward_chunk(config.mm, load_chunk(config, view), state_KxBV, dstate_KxBV, d_o,
                                          config.scale)
        rows = pl.ds(view.t0, c)
        for name in ("dq", "dk", "dbeta", "db"):  # partial-sum outputs [NV, B, H, Tp, *]
            refs[name][j, b, h, rows, :] = grads[name]
        refs["dv"][b, h, rows, pl.ds(j * bv, bv)] = grads["dv"].astype(refs["dv"].dtype)
        return grads["d_state"]

    dstate0 = refs["dfinal"][b, h, :, pl.ds(j * bv, bv)]
    refs["ds0"][b, h, :, pl.ds(j * bv, bv)] = lax.fori_loop(0, lay.num_chunks, chunk, dstate0)


def backward(config: Config, q, k, v, beta, b, seg, states, d_o, d_final):
    """Kernel-level backward on [B, H, Tp, *] arrays -> (dq, dk, dv, dbeta, db, d initial state)."""
    lay = config.layout
    names, args = kernel_inputs(config, q, k, v, beta, b, None, seg)
    names += ["states", "do", "dfinal", "dq", "dk", "dv", "dbeta", "db", "ds0"]
    args += [states, d_o, d_final]
    partial = lambda d: jax.ShapeDtypeStruct(
        (config.num_value_blocks, lay.batch, lay.heads, lay.padded_len, d), F32)
    out_shape = [partial(lay.key_dim), partial(lay.key_dim),
                 jax.ShapeDtypeStruct((lay.batch, lay.heads, lay.padded_len, lay.value_dim), v.dtype),
                 partial(1), partial(1),
                 jax.ShapeDtypeStruct((lay.batch, lay.heads, lay.key_dim, lay.value_dim), F32)]
    dq, dk, dv, dbeta, db, ds0 = pl.pallas_call(
        functools.partial(_backward_kernel, config, names),
        grid=(lay.batch, lay.heads, config.num_value_blocks),
        out_shape=out_shape,
        compiler_params=compiler_params(),
        interpret=config.interpret,
        name="delta_rule_bwd",
    )(*args)
    return dq.sum(0).astype(q.dtype), dk.sum(0).astype(k.dtype), dv, dbeta.sum(0), db.sum(0), ds0
