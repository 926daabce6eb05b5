"""Per-chunk helpers shared by the forward and backward Pallas TPU kernels (Mosaic-friendly jnp).

Within a chunk of C tokens, with `b` the within-chunk cumulative log decay (chunking.py):

    P[t, s] = sum_k q[t, k] k[s, k] exp(b[t, k] - b[s, k])   for s <= t in the same segment, else 0

Scalar decay (G = 1): `P = (q k^T) * exp(b_t - b_s)`, two MXU-friendly [C, C] ops, here. Per-channel
decay (G = K) is in tpu_gates.py.
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


def sum_to(x, decay_dim: int):
    """[C, K] -> [C, G]: per-channel terms summed over channels for scalar decay."""
    return x if decay_dim != 1 else jnp.sum(x, axis=1, keepdims=True)

