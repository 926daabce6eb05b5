"""Per-chunk math shared by the forward and backward Pallas TPU kernels (Mosaic-friendly jnp).

Within a chunk of C tokens, with `b` the within-chunk cumulative log decay (chunking.py):

    P[t, s] = sum_k q[t, k] k[s, k] exp(b[t, k] - b[s, k])   for s <= t in the same segment, else 0

Scalar decay (G = 1): `P = (q k^T) * exp(b_t - b_s)`, two MXU-friendly [C, C] ops. Per-channel decay
(G = K) cannot be factored into one matmul without `exp(-b)` overflowing (b reaches -20 * C), so
it is computed one query row at a time: `P[t, :] = q_t (k * exp(b_t - b))^T`, every exponent <= 0.
"""

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

F32 = jnp.float32
NN = (((1,), (0,)), ((), ()))  # x @ y
NT = (((1,), (1,)), ((), ()))  # x @ y^T
TN = (((0,), (0,)), ((), ()))  # x^T @ y


def dot(x, y, dims=NN, operand_dtype=F32):
    """Matmul with float32 accumulation; operands cast to `operand_dtype` (bfloat16: one MXU pass)."""
    return lax.dot_general(x.astype(operand_dtype), y.astype(operand_dtype), dims,
                           preferred_element_type=F32)


def pair_keep(chunk: int, count_col=None, count_row=None):
    """[C, C] bool: s <= t, and same segment when reset counts are given."""
    t_idx = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
    s_idx = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
    keep = s_idx <= t_idx
    if count_col is not None:
        keep = jnp.logical_and(keep, count_col == count_row)
    return keep


def scalar_decay_weights(b_col, b_row, keep):
    """exp(b_t - b_s) on kept pairs, 0 elsewhere; the exponent is never positive where kept."""
    return jnp.exp(jnp.where(keep, b_col - b_row, -jnp.inf))


def to_column(row_1xC):
    """[1, C] -> [C, 1] with plain VPU ops (select on the diagonal, lane reduction)."""
    c = row_1xC.shape[1]
    eye = lax.broadcasted_iota(jnp.int32, (c, c), 0) == lax.broadcasted_iota(jnp.int32, (c, c), 1)
    return jnp.sum(jnp.where(eye, row_1xC, 0.0), axis=1, keepdims=True)


def to_row(col_Cx1):
    """[C, 1] -> [1, C], the inverse of to_column."""
    c = col_Cx1.shape[0]
    eye = lax.broadcasted_iota(jnp.int32, (c, c), 0) == lax.broadcasted_iota(jnp.int32, (c, c), 1)
    return jnp.sum(jnp.where(eye, col_Cx1, 0.0), axis=0, keepdims=True)


def chunk_vectors(layout, chunk_index, b_ref, segment_refs):
    """Per-chunk decay and segment vectors in both orientations.

    Per-token vectors live in HBM as [NC, C] rows (a [T, 1] column would be padded 128x by the
    (8, 128) tiling); the kernels hold the whole row block of a head and read row `chunk_index`.
    Returns b [C, G], b_row [1, C] (scalar decay) and, with segments, count_col / count_row
    (reset counts), in_col / out_col (flags) and carry [1, 1].
    """
    c = layout.chunk
    v = dict(b_row=None, count_col=None, count_row=None, in_col=None, out_col=None, carry=None)
    if layout.per_channel:
        v["b"] = b_ref[...]
    elif b_ref is not None:
        v["b_row"] = b_ref[pl.ds(chunk_index, 1), :]
        v["b"] = to_column(v["b_row"])
    else:
        v["b_row"], v["b"] = jnp.zeros((1, c), F32), jnp.zeros((c, 1), F32)
    if segment_refs:
        count_ref, in_ref, out_ref = segment_refs
        v["count_row"] = count_ref[pl.ds(chunk_index, 1), :]
        v["count_col"] = to_column(v["count_row"])
        v["in_col"] = to_column(in_ref[pl.ds(chunk_index, 1), :])
        v["out_col"] = to_column(out_ref[pl.ds(chunk_index, 1), :])
        v["carry"] = v["in_col"][c - 1:c, :]
    return v


def row_decay_weights(t, b_t, b, count_col, count_row, chunk: int):
    """[C, K]: exp(b_t - b_s) for key rows s <= t of t's segment, 0 elsewhere (per-channel decay)."""
    s_idx = lax.broadcasted_iota(jnp.int32, (chunk, 1), 0)
    keep = s_idx <= t
    if count_col is not None:
        lane = lax.broadcasted_iota(jnp.int32, (1, chunk), 1)
        count_t = jnp.sum(jnp.where(lane == t, count_row, 0.0), axis=1, keepdims=True)
        keep = jnp.logical_and(keep, count_col == count_t)
    return jnp.exp(jnp.where(keep, b_t - b, -jnp.inf))


def per_channel_scores(q32_ref, b_ref, k, b, count_col, count_row, p_ref, chunk: int):
    """Fills p_ref [C, C] with P, one query row per loop step."""
    def row(t, carry):
        e = row_decay_weights(t, b_ref[pl.ds(t, 1), :], b, count_col, count_row, chunk)
        p_ref[pl.ds(t, 1), :] = dot(q32_ref[pl.ds(t, 1), :], k * e, NT)
        return carry

    lax.fori_loop(0, chunk, row, 0)


def per_channel_score_grads(q32_ref, b_ref, do32_ref, k, v, b, count_col, count_row, p_ref, dq_ref,
                            scale: float, chunk: int):
    """P into p_ref, dL/dq through P into dq_ref (rows), returns dL/dk through P [C, K].

    With dP = scale * do v^T: dq[t] = sum_s dP[t, s] (k * E_t)[s], dk[s] += dP[t, s] q_t E_t[s].
    """
    def row(t, dk_acc):
        q_t = q32_ref[pl.ds(t, 1), :]
        do_t = do32_ref[pl.ds(t, 1), :]
        e = row_decay_weights(t, b_ref[pl.ds(t, 1), :], b, count_col, count_row, chunk)
        ke = k * e
        p_ref[pl.ds(t, 1), :] = dot(q_t, ke, NT)
        dp_row = scale * dot(do_t, v, NT)  # [1, C]
        dq_ref[pl.ds(t, 1), :] = dot(dp_row, ke)
        dp_col = scale * dot(v, do_t, NT)  # [C, 1]
        return dk_acc + dp_col * (q_t * e)

    return lax.fori_loop(0, chunk, row, jnp.zeros(k.shape, F32))


def sum_to(x, decay_dim: int):
    """[C, K] -> [C, G]: per-channel terms summed over channels for scalar decay."""
    return x if decay_dim != 1 else jnp.sum(x, axis=1, keepdims=True)

