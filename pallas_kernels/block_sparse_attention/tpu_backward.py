"""Backward Pallas TPU kernels of block-sparse attention (forward and notation: tpu.py).

With p_tj = exp(s_tj - lse_t) on visible pairs (0 elsewhere), delta_t = sum_d o_td do_td
(FlashAttention-2's D, computed here in jnp):

    dp = do v^T,   ds = p * (dp - delta),   dq = scale * ds k,   dk = scale * ds^T q,   dv = p^T do

- dq: the forward's grid (B, H, num_q_blocks, n_sel) and slot codes; dq [bq, D] accumulates in
  float32 VMEM over the listed key blocks.
- dk, dv: grid (B, Hkv, W) over the listed (query head of the group, query block, key block)
  triples of each kv head, sorted by key block (tpu.key_major_pairs, built in jnp and
  scalar-prefetched; W = G num_q_blocks min(n_sel, num_kv_blocks), the forward's step count, not
  the dense G num_q_blocks num_kv_blocks). The pairs of one key block are consecutive, so its dk, dv
  accumulate in float32 VMEM over the whole GQA group (no per-query-head copies to sum) and are
  written once when its run ends; q, do, lse, delta are DMA'd only for listed pairs.

bfloat16 inputs: p and ds are rounded to bfloat16 as MXU operands, accumulation is float32.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from hybrax.pallas_kernels.block_sparse_attention.tpu import (F32, NT, TN, Config, compiler_params, dot,
                                                       forward_slot, forward_specs, key_major_pairs,
                                                       row_specs, visible, visited_key_blocks)


def probabilities(config: Config, q_block, k_block, q, k, lse_Qx1, segment_refs):
    """p [bq, bk] float32: exp(s - lse) on visible pairs, 0 elsewhere."""
    keep_QxK = visible(config, q_block, k_block, segment_refs)
    s_QxK = config.scale * dot(config, q, k, NT)
    return jnp.where(keep_QxK, jnp.exp(jnp.where(keep_QxK, s_QxK - lse_Qx1, 0.0)), 0.0)


def _dq_kernel(config: Config, codes_ref, q_ref, k_ref, v_ref, *refs):
    segment_refs = refs[:2] if config.has_segments else ()
    do_ref, lse_ref, delta_ref, dq_ref, acc_ref = refs[len(segment_refs):]
    b, h, n, j = (pl.program_id(axis) for axis in range(4))
    code = codes_ref[forward_slot(config)(b, h, n, j)]

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, F32)

    @pl.when(code >= 0)
    def _accumulate():
        p_QxK = probabilities(config, n, code, q_ref[...], k_ref[...], lse_ref[...], segment_refs)
        dp_QxK = dot(config, do_ref[...], v_ref[...], NT)
        ds_QxK = p_QxK * (dp_QxK - delta_ref[...])
        acc_ref[...] += dot(config, ds_QxK, k_ref[...])

    @pl.when(j == config.n_sel - 1)
    def _finish():
        dq_ref[...] = (config.scale * acc_ref[...]).astype(dq_ref.dtype)


def dq(config: Config, q, k, v, codes, segments, do, lse, delta):
    B, H, nq, bq, D = config.batch, config.heads, config.num_q_blocks, config.block_q, config.head_dim
    q_spec, kv_spec, column_spec, segment_specs = forward_specs(config)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(B, H, nq, config.n_sel),
        in_specs=[q_spec, kv_spec, kv_spec, *segment_specs, q_spec, column_spec, column_spec],
        out_specs=q_spec,
        scratch_shapes=[pltpu.VMEM((bq, D), F32)],
    )
    return pl.pallas_call(
        functools.partial(_dq_kernel, config),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=compiler_params(),
        interpret=config.interpret,
        name="block_sparse_attention_bwd_dq",
    )(codes.reshape(-1), q, k, v, *segments, do, lse, delta)


def dkv_specs(config: Config, width: int):
    """Specs on grid (b, kv head, pair t) over tpu.key_major_pairs (prefetched: key_block, query, flags)."""
    bq, bk, D, G, nq, Hkv = (config.block_q, config.block_k, config.head_dim, config.groups,
                             config.num_q_blocks, config.kv_heads)

    def query(b, kh, t, key_block, pair_query, flags):
        pair = pair_query[(b * Hkv + kh) * width + t]
        return b, kh * G + lax.div(pair, nq), lax.rem(pair, nq)  # pair >= 0: no sign fix-ups

    def key(b, kh, t, key_block, pair_query, flags):
        return b, key_block[(b * Hkv + kh) * width + t]

    def head_map(*args):
        b, h, n = query(*args)
        return b, h, n, 0

    def kv_map(*args):
        b, m = key(*args)
        return b, args[1], m, 0

    rows = row_specs(config, query, key)
    segments = [rows["q_seg"], rows["k_seg"]] if config.has_segments else []
    return (pl.BlockSpec((None, None, bq, D), head_map), pl.BlockSpec((None, None, bk, D), kv_map),
            rows["head_column"], segments)


def _dkv_kernel(config: Config, width: int, key_block_ref, pair_query_ref, flags_ref, q_ref, k_ref, v_ref,
                *refs):
    segment_refs = refs[:2] if config.has_segments else ()
    do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_acc_ref, dv_acc_ref = refs[len(segment_refs):]
    b, kh, t = (pl.program_id(axis) for axis in range(3))
    slot = (b * config.kv_heads + kh) * width + t
    flags = flags_ref[slot]

    @pl.when(lax.rem(lax.div(flags, 2), 2) == 1)  # first pair of this key block
    def _init():
        dk_acc_ref[...] = jnp.zeros(dk_acc_ref.shape, F32)
        dv_acc_ref[...] = jnp.zeros(dv_acc_ref.shape, F32)

    @pl.when(lax.rem(flags, 2) == 1)
    def _accumulate():
        n = lax.rem(pair_query_ref[slot], config.num_q_blocks)
        q, do = q_ref[...], do_ref[...]
        p_QxK = probabilities(config, n, key_block_ref[slot], q, k_ref[...], lse_ref[...], segment_refs)
        dv_acc_ref[...] += dot(config, p_QxK, do, TN)
        dp_QxK = dot(config, do, v_ref[...], NT)
        ds_QxK = p_QxK * (dp_QxK - delta_ref[...])
        dk_acc_ref[...] += dot(config, ds_QxK, q, TN)

    @pl.when(flags >= 4)  # last pair of this key block
    def _finish():
        dk_ref[...] = (config.scale * dk_acc_ref[...]).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc_ref[...].astype(dv_ref.dtype)


def dkv(config: Config, q, k, v, codes, segments, do, lse, delta):
    """dk, dv [B, Hkv, Sk, D]; key blocks no query block lists are zero."""
    B, Hkv, bk, D = config.batch, config.kv_heads, config.block_k, config.head_dim
    schedule = key_major_pairs(codes, config)
    width = schedule[0].shape[-1]
    q_spec, kv_spec, column_spec, segment_specs = dkv_specs(config, width)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(B, Hkv, width),
        in_specs=[q_spec, kv_spec, kv_spec, *segment_specs, q_spec, column_spec, column_spec],
        out_specs=[kv_spec, kv_spec],
        scratch_shapes=[pltpu.VMEM((bk, D), F32), pltpu.VMEM((bk, D), F32)],
    )
    dk_, dv_ = pl.pallas_call(
        functools.partial(_dkv_kernel, config, width),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=compiler_params(grid_rank=3),
        interpret=config.interpret,
        name="block_sparse_attention_bwd_dkv",
    )(*(x.reshape(-1) for x in schedule), q, k, v, *segments, do, lse, delta)
    # Blocks without pairs were never written: zero them.
    visited_Sk = jnp.repeat(visited_key_blocks(codes, config), bk, axis=-1)[..., None]
    return jnp.where(visited_Sk, dk_, 0), jnp.where(visited_Sk, dv_, 0)


def backward(config: Config, q, k, v, codes, segments, o, lse, do):
    """(dq, dk, dv) in the kernel layout, from the forward's residuals and do [B, H, Tq, D]."""
    do = do.astype(q.dtype)
    delta = jnp.sum(o.astype(F32) * do.astype(F32), axis=-1, keepdims=True)
    dq_ = dq(config, q, k, v, codes, segments, do, lse, delta)
    dk_, dv_ = dkv(config, q, k, v, codes, segments, do, lse, delta)
    return dq_, dk_, dv_
