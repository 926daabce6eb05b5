"""Intra-chunk part of per-channel-gated linear attention (GLA) for the Pallas TPU kernels.

Within a chunk of C tokens, with b the within-chunk cumulative log gates [C, K]:

    P[t, s] = sum_k q[t, k] k[s, k] exp(b[t, k] - b[s, k])     for s <= t in t's segment

`exp(b_t - b_s)` does not factor into one matmul without `exp(-b)` overflowing (b reaches -20 * C).
The chunk is split into sub-blocks of R rows (R = 16, or 8). For query block r and every key
s < r R, with the reference row m = r R - 1 (s <= m < t):

    exp(b_t - b_s) = exp(b_t - b_m) * exp(b_m - b_s),   both exponents <= 0,

so the off-diagonal part is one MXU matmul per query block. The R x R diagonal blocks are done one
query row at a time against the R keys of its block (exact, exponents <= 0). Each query row thus
costs R (not C) key rows of exponentials; the off-diagonal blocks cost C / R of them.
"""

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from hybrax.pallas_kernels.linear_attention.tpu_chunk import F32, NT, TN, dot


def sub_block(chunk: int) -> int:
    return 16 if chunk % 16 == 0 else 8


def _off_diagonal(q, k, b, count_col, count_row, chunk: int, sub: int, r: int):
    """Query block r against all keys before it: (q factor [R, K], key factor [C, K], keep [R, C],
    query-side weight [R, K], key-side weight [C, K])."""
    lo = r * sub
    ref = b[lo - 1:lo, :]
    q_weight = jnp.exp(b[lo:lo + sub] - ref)
    k_weight = jnp.exp(jnp.minimum(ref - b, 0.0))  # exact for the kept keys s < lo
    keep = lax.broadcasted_iota(jnp.int32, (sub, chunk), 1) < lo
    if count_col is not None:
        keep = jnp.logical_and(keep, count_col[lo:lo + sub] == count_row)
    return q[lo:lo + sub] * q_weight, k * k_weight, keep, q_weight, k_weight


def _diagonal_weights(t, sub: int, b_ref, count_ref):
    """Query row t against the keys of its own block: (block start, exp(b_t - b_s) [R, K])."""
    start = pl.multiple_of(lax.div(t, jnp.asarray(sub, t.dtype)) * sub, sub)  # t >= 0: no floor-div sign fixup
    s_idx = lax.broadcasted_iota(jnp.int32, (sub, 1), 0) + start
    keep = s_idx <= t
    if count_ref is not None:
        keep = jnp.logical_and(keep, count_ref[pl.ds(start, sub), :] == count_ref[pl.ds(t, 1), :])
    diff = b_ref[pl.ds(t, 1), :] - b_ref[pl.ds(start, sub), :]
    return start, jnp.exp(jnp.where(keep, diff, -jnp.inf))


def scores_times_values(refs, q, k, v, b, count_col, count_row, chunk: int, mm):
    """P v [C, V] (unscaled). refs: q32, k32, v32 [C, *] float32 copies, b, count (or None) and
    the output scratch out [C, V]."""
    sub = sub_block(chunk)
    out_ref = refs["out"]
    out_ref[0:sub, :] = jnp.zeros((sub, v.shape[1]), F32)
    for r in range(1, chunk // sub):
        q_r, k_all, keep, _, _ = _off_diagonal(q, k, b, count_col, count_row, chunk, sub, r)
        p = jnp.where(keep, mm(q_r, k_all, NT), 0.0)
        out_ref[r * sub:(r + 1) * sub, :] = mm(p, v)

    def row(t, carry):
        start, e = _diagonal_weights(t, sub, refs["b"], refs["count"])
        p_t = dot(refs["q32"][pl.ds(t, 1), :], refs["k32"][pl.ds(start, sub), :] * e, NT)  # [1, R]
        out_ref[pl.ds(t, 1), :] += dot(p_t, refs["v32"][pl.ds(start, sub), :])
        return carry

    lax.fori_loop(0, chunk, row, 0)
    return out_ref[...]


def score_grads(refs, q, k, v, do, b, count_col, count_row, scale: float, chunk: int, mm):
    """Gradients through P of L = sum(do * scale * P v): (dq [C, K], dk [C, K], dv [C, V]).
    refs: q32, k32, v32, do32 float32 copies, b, count (or None), scratch dq, dk, dv."""
    sub = sub_block(chunk)
    dq_ref, dk_ref, dv_ref = refs["dq"], refs["dk"], refs["dv"]
    dq_ref[0:sub, :] = jnp.zeros((sub, q.shape[1]), F32)
    dk_acc = jnp.zeros(k.shape, F32)
    dv_acc = jnp.zeros(v.shape, F32)
    for r in range(1, chunk // sub):
        rows = slice(r * sub, (r + 1) * sub)
        q_r, k_all, keep, q_weight, k_weight = _off_diagonal(q, k, b, count_col, count_row, chunk,
                                                             sub, r)
        p = jnp.where(keep, mm(q_r, k_all, NT), 0.0)
        dp = jnp.where(keep, scale * mm(do[rows], v, NT), 0.0)
        dq_ref[rows, :] = mm(dp, k_all) * q_weight
        dk_acc = dk_acc + mm(dp, q_r, TN) * k_weight
        dv_acc = dv_acc + scale * mm(p, do[rows], TN)
    dk_ref[...] = dk_acc
    dv_ref[...] = dv_acc

    def row(t, carry):
        start, e = _diagonal_weights(t, sub, refs["b"], refs["count"])
        q_t = refs["q32"][pl.ds(t, 1), :]
        do_t = refs["do32"][pl.ds(t, 1), :]
        v_blk = refs["v32"][pl.ds(start, sub), :]
        ke = refs["k32"][pl.ds(start, sub), :] * e
        dp_row = scale * dot(do_t, v_blk, NT)  # [1, R]
        dq_ref[pl.ds(t, 1), :] += dot(dp_row, ke)
        dp_col = scale * dot(v_blk, do_t, NT)  # [R, 1]
        dk_ref[pl.ds(start, sub), :] += dp_col * (q_t * e)
        p_col = dot(ke, q_t, NT)  # [R, 1]
        dv_ref[pl.ds(start, sub), :] += scale * p_col * do_t
        return carry

    lax.fori_loop(0, chunk, row, 0)
    return dq_ref[...], dk_ref[...], dv_ref[...]
