"""Per-chunk math of the Pallas mLSTM kernels, shared by TPU and GPU, forward and backward.

Plain jnp on loaded values that both Mosaic and Triton lower: iota masks, where, exp, sums over
one axis, and matmuls through the kernel's own `mm(x, y, dims)` (operand dtype and transposes are
the kernel's business). Rows and columns are converted with a diagonal select and a reduction, and
the chunk's last row is picked by a masked sum (no slicing of values). Notation: tpu.py (forward)
and tpu_backward.py (backward).
"""

import jax.numpy as jnp
from jax import lax

F32 = jnp.float32
NN = (((1,), (0,)), ((), ()))  # x @ y
NT = (((1,), (1,)), ((), ()))  # x @ y^T
TN = (((0,), (0,)), ((), ()))  # x^T @ y


def _eye(c):
    return lax.broadcasted_iota(jnp.int32, (c, c), 0) == lax.broadcasted_iota(jnp.int32, (c, c), 1)


def to_column(row_1xC):
    """[1, C] -> [C, 1] (select on the diagonal, lane reduction)."""
    return jnp.sum(jnp.where(_eye(row_1xC.shape[1]), row_1xC, 0.0), axis=1, keepdims=True)


def to_row(col_Cx1):
    """[C, 1] -> [1, C], the inverse of to_column."""
    return jnp.sum(jnp.where(_eye(col_Cx1.shape[0]), col_Cx1, 0.0), axis=0, keepdims=True)


def is_last(shape):
    """Bool mask of the last row of a [C, ...] array."""
    return lax.broadcasted_iota(jnp.int32, shape, 0) == shape[0] - 1


def last_row(x):
    """x[-1:, :] as a masked sum."""
    return jnp.sum(jnp.where(is_last(x.shape), x, 0.0), axis=0, keepdims=True)


def gate_weights(chunk: int, seq_len: int, chunk_index, li_row, lf_row, count_row, in_row, m_in_1x1, exact_mm):
    """P [L, L], e, m [L, 1] and the masks of one chunk from its gate rows [1, L] (count_row, in_row
    None without segments) and the entering stabiliser [1, 1]. exact_mm: a float32 matmul."""
    c = chunk
    row = lax.broadcasted_iota(jnp.int32, (c, c), 0)  # i (or m)
    col = lax.broadcasted_iota(jnp.int32, (c, c), 1)  # j (or m)
    keep = col <= row  # [i, m]: m <= i, within i's segment
    if count_row is not None:
        keep = jnp.logical_and(keep, to_column(count_row) == count_row)
        reaches = to_column(in_row) > 0  # [L, 1]: the entering state reaches token i
    else:
        reaches = jnp.full((c, 1), True)
    position = chunk_index * c + lax.broadcasted_iota(jnp.int32, (1, c), 1)
    feeds = jnp.logical_and(keep, position < seq_len)  # [i, j]: j feeds i (not padding)
    gates = jnp.where(keep, lf_row, 0.0)  # [i, m] = lf_m on i's segment up to i
    upper = (row > col).astype(F32)  # [m, j]: m > j
    z = jnp.sum(gates, axis=1, keepdims=True)  # decay of the state reaching i (from its entry)
    w = exact_mm(gates, upper, NN) + li_row  # [i, j]: lf_{j+1} + .. + lf_i + li_j
    carried = z + jnp.where(reaches, m_in_1x1, 0.0)  # the zero state entered with m = 0
    m = jnp.maximum(carried, jnp.max(jnp.where(feeds, w, -jnp.inf), axis=1, keepdims=True))
    p = jnp.exp(jnp.where(feeds, w - m, -jnp.inf))
    e = jnp.exp(jnp.where(reaches, carried - m, -jnp.inf))
    valid = (chunk_index * c + lax.broadcasted_iota(jnp.int32, (c, 1), 0)) < seq_len
    return dict(p=p, e=e, m=m, keep=keep, upper=upper, valid=valid)


def outputs(scale, mm, q, k, v, weights, c_in, n_in):
    """h and the intermediates the backward needs, for one chunk (v and c_in: a slice of V)."""
    a = scale * mm(q, k, NT) * weights["p"]
    qe = scale * q * weights["e"]
    inter_num = mm(qe, c_in, NN)
    inter_den = jnp.sum(qe * n_in, axis=1, keepdims=True)
    num = mm(a, v, NN) + inter_num
    den = jnp.sum(a, axis=1, keepdims=True) + inter_den
    raw_floor = jnp.maximum(jnp.abs(den), jnp.exp(-weights["m"]))
    # exp(-m) underflows for large m; with q = 0 (padding) h = 0 / 0: divide by 1 there.
    floor = jnp.where(jnp.logical_and(raw_floor > 0, weights["valid"]), raw_floor, 1.0)
    return dict(h=num / floor, num=num, den=den, floor=floor, raw_floor=raw_floor, a=a, qe=qe,
                inter_num=inter_num, inter_den=inter_den)


def next_state(mm, k, v, weights, c_in, n_in):
    """(C, n, m) leaving the chunk: f C + k^T diag(a) v, f n + a k, m_L."""
    a_col = to_column(last_row(weights["p"]))
    f = last_row(weights["e"])
    k_weighted = k * a_col
    return (f * c_in + mm(k_weighted, v, TN), f * n_in + jnp.sum(k_weighted, axis=0, keepdims=True),
            last_row(weights["m"]))


def grads(scale, mm, exact_mm, q, k, v, dh, delta, weights, out, c_in, n_in, dc, dn, n_share=1.0):
    """Gradients of one chunk (tpu_backward.py has the formulas): (dq, dk, dv, dli_row, dlf_row,
    dC_in, dn_in). delta [L, 1] = sum over all of V of dh * h. With value blocks (GPU), v, dh, c_in,
    dc are one block's slice and n_share is 1 in one block, 0 in the others: terms of n and of the
    denominator, which every block computes, are counted once when the partials are summed."""
    p, e, floor = weights["p"], weights["e"], out["floor"]
    g_out = dh / floor  # G
    d_floor = -delta / floor
    den = out["den"]
    uses_den = jnp.logical_and(jnp.abs(den) >= jnp.exp(-weights["m"]),
                               jnp.logical_and(out["raw_floor"] > 0, weights["valid"]))
    g = jnp.where(uses_den, jnp.where(den > 0, d_floor, jnp.where(den < 0, -d_floor, 0.0)), 0.0)  # [L, 1]
    g_once = g * n_share

    d_a = mm(g_out, v, NT) + g_once  # [L, L]
    d_scores = d_a * p
    dq = scale * mm(d_scores, k, NN) + scale * e * (mm(g_out, c_in, NT) + g_once * n_in)
    dk = scale * mm(d_scores, q, TN)
    dv = mm(out["a"], g_out, TN)

    a_col = to_column(last_row(p))
    f = last_row(e)
    k_dc = mm(k, dc, NN)  # [L, V]
    dn_once = dn * n_share
    dk = dk + a_col * (mm(v, dc, NT) + dn_once)
    dv = dv + a_col * k_dc
    d_a_col = jnp.sum(k_dc * v, axis=1, keepdims=True) + jnp.sum(k * dn_once, axis=1, keepdims=True)
    d_f = (jnp.sum(jnp.sum(dc * c_in, axis=1, keepdims=True), axis=0, keepdims=True)
           + jnp.sum(dn_once * n_in, axis=1, keepdims=True))  # [1, 1]

    d_w = d_a * out["a"] + jnp.where(is_last(p.shape), to_row(a_col * d_a_col), 0.0)
    d_z = (jnp.sum(g_out * out["inter_num"], axis=1, keepdims=True) + g_once * out["inter_den"]
           + jnp.where(is_last((p.shape[0], 1)), f * d_f, 0.0))
    d_gates = jnp.where(weights["keep"], exact_mm(d_w, weights["upper"], NT) + d_z, 0.0)  # [i, m]
    dli_row = jnp.sum(d_w, axis=0, keepdims=True)
    dlf_row = jnp.sum(d_gates, axis=0, keepdims=True)
    dc_in = mm(out["qe"], g_out, TN) + f * dc
    dn_in = jnp.sum(g * out["qe"], axis=0, keepdims=True) + f * dn
    return dq, dk, dv, dli_row, dlf_row, dc_in, dn_in
