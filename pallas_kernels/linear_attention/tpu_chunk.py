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


def row_decay_weights(t, b_t, b, count_ref, count_col, chunk: int):
    """[C, K]: exp(b_t - b_s) for key rows s <= t of t's segment, 0 elsewhere (per-channel decay)."""
    s_idx = lax.broadcasted_iota(jnp.int32, (chunk, 1), 0)
    keep = s_idx <= t
    if count_ref is not None:
        keep = jnp.logical_and(keep, count_col == count_ref[pl.ds(t, 1), :])
    return jnp.exp(jnp.where(keep, b_t - b, -jnp.inf))


def per_channel_scores(q32_ref, b_ref, k, b, count_ref, count_col, p_ref, chunk: int):
    """Fills p_ref [C, C] with P, one query row per loop step."""
    def row(t, carry):
        e = row_decay_weights(t, b_ref[pl.ds(t, 1), :], b, count_ref, count_col, chunk)
        p_ref[pl.ds(t, 1), :] = dot(q32_ref[pl.ds(t, 1), :], k * e, NT)
        return carry

    lax.fori_loop(0, chunk, row, 0)


def per_channel_score_grads(q32_ref, b_ref, do32_ref, k, v, b, count_ref, count_col, p_ref, dq_ref,
                            scale: float, chunk: int):
    """P into p_ref, dL/dq through P into dq_ref (rows), returns dL/dk through P [C, K].

    With dP = scale * do v^T: dq[t] = sum_s dP[t, s] (k * E_t)[s], dk[s] += dP[t, s] q_t E_t[s].
    """
    def row(t, dk_acc):
        q_t = q32_ref[pl.ds(t, 1), :]
        do_t = do32_ref[pl.ds(t, 1), :]
        e = row_decay_weights(t, b_ref[pl.ds(t, 1), :], b, count_ref, count_col, chunk)
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

