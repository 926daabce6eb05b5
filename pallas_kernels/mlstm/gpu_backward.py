"""Backward Pallas GPU (Triton) kernel of the chunked mLSTM (forward: gpu.py).

Grid (B, H, V / BV); each program walks the chunks in reverse carrying its [K, BV] slice of dC and
its own copy of dn [1, K] (the gradients of the state leaving the chunk), and reads the state
entering the chunk saved by the forward. The per-chunk formulas are chunk_math.grads (notation:
tpu_backward.py); every stabiliser is a constant. The denominator's gradient needs sum_v dh * h over
all of V: the wrapper computes it (`delta`, as flash attention does) from the saved output. dv and
dC are exact per value block; dq, dk and the gate gradients are sums over value blocks, so each
program writes its partial (terms of n and of the denominator only in block 0) and the wrapper adds
them; dn is the same in every block.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from hybrax.pallas_kernels.mlstm import chunk_math
from hybrax.pallas_kernels.mlstm.gpu import F32, ChunkView, Config, compiler_params, exact_mm, kernel_inputs


def _backward_kernel(config: Config, names, *refs):
    lay, bv = config.layout, config.value_block
    refs = dict(zip(names, refs))
    b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    values = pl.ds(j * bv, bv)
    n_share = (1 - jnp.minimum(j, 1)).astype(F32)  # 1 in block 0 (a scalar select lowers badly to Triton)

    def chunk(step, carry):
        dc, dn = carry
        i = lay.num_chunks - 1 - step
        view = ChunkView(config, refs, (b, h, j), i)
        c_in = refs["c_states"][b, h, i, :, values]
        n_in = refs["n_states"][b, h, i]
        m_in = refs["m_states"][b, h, i]
        weights = view.weights(m_in)
        q, k, v = view.qkv()
        out = chunk_math.outputs(config.scale, config.mm, q, k, v, weights, c_in, n_in)
        dh = view.tokens("dh", True).astype(F32)
        delta = view.tokens("delta")
        dq, dk, dv, dli, dlf, dc_in, dn_in = chunk_math.grads(
            config.scale, config.mm, exact_mm, q, k, v, dh, delta, weights, out, c_in, n_in, dc, dn, n_share)
        rows = pl.ds(view.t0, lay.chunk)
        refs["dq"][j, b, h, rows, :] = dq
        refs["dk"][j, b, h, rows, :] = dk
        refs["dv"][b, h, rows, values] = dv.astype(refs["dv"].dtype)
        refs["dli"][j, b, h, i] = dli
        refs["dlf"][j, b, h, i] = dlf
        return dc_in, dn_in

    carry = (refs["dc_final"][b, h, :, values], refs["dn_final"][b, h])
    dc0, dn0 = lax.fori_loop(0, lay.num_chunks, chunk, carry)
    refs["dc0"][b, h, :, values] = dc0
    refs["dn0"][b, h] = dn0  # the same in every value block


def backward(config: Config, q, k, v, li, lf, seg, states, dh, dc, dn, h):
    """Kernel-level backward on [B, H, Tp, *] arrays -> (dq, dk, dv, dli, dlf, dC0, dn0)."""
    lay = config.layout
    names, args = kernel_inputs(q, k, v, li, lf, None, seg)
    delta = jnp.sum(dh.astype(F32) * h.astype(F32), axis=-1, keepdims=True)  # [B, H, Tp, 1]
    names += ["c_states", "n_states", "m_states", "dh", "delta", "dc_final", "dn_final"]
    args += [*states, dh, delta, dc, dn]
    partial = lambda shape: jax.ShapeDtypeStruct((config.num_value_blocks,) + shape, F32)
    bh = (lay.batch, lay.heads)
    out_shape = [partial(bh + (lay.padded_len, lay.key_dim)), partial(bh + (lay.padded_len, lay.key_dim)),
                 jax.ShapeDtypeStruct(bh + (lay.padded_len, lay.value_dim), v.dtype),
                 partial(li.shape), partial(lf.shape),
                 jax.ShapeDtypeStruct(bh + (lay.key_dim, lay.value_dim), F32),
                 jax.ShapeDtypeStruct(bh + (1, lay.key_dim), F32)]
    names += ["dq", "dk", "dv", "dli", "dlf", "dc0", "dn0"]
    dq, dk, dv, dli, dlf, dc0, dn0 = pl.pallas_call(
        functools.partial(_backward_kernel, config, names),
        grid=(lay.batch, lay.heads, config.num_value_blocks),
        out_shape=out_shape,
        compiler_params=compiler_params(),
        interpret=config.interpret,
        name="mlstm_bwd",
    )(*args)
    return (dq.sum(0).astype(q.dtype), dk.sum(0).astype(k.dtype), dv, dli.sum(0), dlf.sum(0), dc0, dn0)
