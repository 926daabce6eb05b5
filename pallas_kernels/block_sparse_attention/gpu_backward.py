"""Backward Pallas GPU (Triton) kernels of block-sparse attention (forward and math: gpu.py).

With p = exp(s - lse) (lse saved by the forward), delta = rowsum(do * o) and ds = p * (dp - delta),
dp = do v^T (FlashAttention-2, Dao 2023):

- dq kernel, grid (B H, Nq): like the forward, query block n walks its list and accumulates
  dq_n = scale * sum_m ds k_m.
- dk/dv kernel, grid (B Hkv, Nk): key block m walks, for each query head of its group, the
  inverse list of m (the query blocks whose list holds m, ascending, -1 after them; built here
  with a scatter and a sort, width Nq) and accumulates dv_m = sum p^T do_n and
  dk_m = scale * sum ds^T q_n. The group sum (GQA) happens in registers, not in a [B, H, S, D]
  buffer.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from hybrax.pallas_kernels.block_sparse_attention.gpu import F32, Config, compiler_params, kernel_inputs, masked_scores


def _query_block(refs, b, h, n):
    """q, do [Bq', D'] and lse, delta [Bq', 1] of query block n of head h."""
    return refs["q"][b, h, n], refs["do"][b, h, n], refs["lse"][b, h, n], refs["delta"][b, h, n]


def _dq_kernel(config: Config, names, *refs):
    refs = dict(zip(names, refs))
    bh, n = pl.program_id(0), pl.program_id(1)
    b, h = bh // config.heads, bh % config.heads
    h_kv = h // config.groups
    q, do, lse, delta = _query_block(refs, b, h, n)

    def visit(slot, dq):
        m = refs["lists"][b, h, n, slot]
        k = refs["k"][b, h_kv, m]
        p = jnp.exp(masked_scores(config, refs, q, k, b, n, m) - lse)
        ds = p * (config.dot(do, refs["v"][b, h_kv, m].T) - delta)
        return dq + config.dot(config.operand(ds), k)

    dq = lax.fori_loop(0, refs["counts"][b, h, n], visit,
                       jnp.zeros((config.padded_block_q, config.head_dim), F32))
    refs["dq"][b, h, n] = (config.scale * dq).astype(refs["dq"].dtype)


def _dkv_kernel(config: Config, names, *refs):
    refs = dict(zip(names, refs))
    bh, m = pl.program_id(0), pl.program_id(1)
    b, h_kv = bh // config.kv_heads, bh % config.kv_heads
    k, v = refs["k"][b, h_kv, m], refs["v"][b, h_kv, m]

    def head(g, carry):
        h = h_kv * config.groups + g

        def visit(i, carry):
            dk, dv = carry
            n = refs["inverse"][b, h, m, i]
            q, do, lse, delta = _query_block(refs, b, h, n)
            p = jnp.exp(masked_scores(config, refs, q, k, b, n, m) - lse)
            ds = p * (config.dot(do, v.T) - delta)
            return (dk + config.dot(config.operand(ds).T, q),
                    dv + config.dot(config.operand(p).T, do))

        return lax.fori_loop(0, refs["inverse_counts"][b, h, m], visit, carry)

    zeros = jnp.zeros((config.padded_block_k, config.head_dim), F32)
    dk, dv = lax.fori_loop(0, config.groups, head, (zeros, zeros))
    refs["dk"][b, h_kv, m] = (config.scale * dk).astype(refs["dk"].dtype)
    refs["dv"][b, h_kv, m] = dv.astype(refs["dv"].dtype)


def inverse_lists(lists, num_kv_blocks: int):
    """lists [B, H, Nq, n_sel] (-1 = none) -> (inverse [B, H, Nk, Nq], counts [B, H, Nk]): for key
    block m the query blocks listing it, ascending, -1 after them."""
    B, H, nq, _ = lists.shape
    b = jnp.arange(B)[:, None, None, None]
    h = jnp.arange(H)[None, :, None, None]
    n = jnp.arange(nq)[None, None, :, None]
    target = jnp.where(lists < 0, num_kv_blocks, lists)  # -1 lands in a dropped extra column
    listed = jnp.zeros((B, H, num_kv_blocks + 1, nq), bool).at[b, h, target, n].set(True)[:, :, :num_kv_blocks]
    ordered = jnp.sort(jnp.where(listed, jnp.arange(nq, dtype=jnp.int32), nq), axis=-1)
    return jnp.where(ordered < nq, ordered, -1), jnp.sum(listed, axis=-1, dtype=jnp.int32)


def backward(config: Config, q, k, v, lists, counts, segments, o, lse, do):
    """Block-layout gradients (dq, dk, dv) of the forward's o (see gpu.forward)."""
    delta = jnp.sum(o.astype(F32) * do.astype(F32), axis=-1, keepdims=True)  # [B, H, Nq, Bq', 1]
    inverse, inverse_counts = inverse_lists(lists, config.num_kv_blocks)
    common = dict(q=q, k=k, v=v, q_segment=segments[0] if segments else None,
                  k_segment=segments[1] if segments else None, lse=lse, do=do, delta=delta)
    dq_names, dq_args = kernel_inputs(dict(common, lists=lists, counts=counts))
    dkv_names, dkv_args = kernel_inputs(dict(common, inverse=inverse, inverse_counts=inverse_counts))
    call = functools.partial(pl.pallas_call, compiler_params=compiler_params(config),
                             interpret=config.interpret)
    dq = call(functools.partial(_dq_kernel, config, dq_names + ["dq"]),
              grid=(config.batch * config.heads, config.num_q_blocks),
              out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
              name="block_sparse_attention_bwd_dq")(*dq_args)
    dk, dv = call(functools.partial(_dkv_kernel, config, dkv_names + ["dk", "dv"]),
                  grid=(config.batch * config.kv_heads, config.num_kv_blocks),
                  out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
                  name="block_sparse_attention_bwd_dkv")(*dkv_args)
    return dq, dk, dv
