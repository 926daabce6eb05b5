"""Per-chunk math of the gated delta rule shared by the Pallas kernels (tpu*.py, gpu*.py).

Generic jnp + `lax.dot_general` on values already loaded from refs, so the same code lowers through
Mosaic (TPU) and Triton (GPU) and runs in interpret mode. One chunk of C tokens, S [K, V] the state
entering it, b the within-chunk inclusive cumulative log decay, per-token scalars as columns [C, 1]:

    G_ij  = exp(b_i - b_j) for j <= i in the same segment, else 0     (exponent <= 0, never exp(-b))
    A     = strict_lower(beta_i (k_i . k_j) G_ij),   T = (I + A)^{-1}
    W     = T (beta exp(b) in k)  [C, K],     U = T (beta v)  [C, V]      (the UT transform)
    X     = U - W S
    o     = scale ((q exp(b) in) S + (q k^T * G) X)
    S_new = exp(b_C) carry S + (k exp(b_C - b) out)^T X

(in / out / carry: the segment flags of linear_attention's chunking.py: the state reaches token i,
token j reaches the outgoing state, the state survives the chunk.)

T by recursive doubling in full-size matmuls (`unit_lower_inverse`): the same exact block recursion
as xla.py, written as D <- D - D L D with D the block-diagonal inverse so far and L the masked
below-left sub-blocks, so it is 2 log2(C) square matmuls and iota masks, which both Mosaic and
Triton lower well (no reshapes of small blocks; no C sequential 1-row steps as forward
substitution would need; the product form (I - A)(I + A^2)(I + A^4).. is cheaper but cancels
catastrophically in float32 when beta = 1).

Backward (`backward_chunk`), with dS the gradient of S_new and do that of o:

    dX  = scale (qk^T*G)^T do + kd dS                 dS_prev = scale qd^T do + sigma dS - W^T dX
    dP  = scale do X^T  (dq += (dP*G) k, dk += (dP*G)^T q)
    dW  = -dX S^T,   [dWraw, d(beta v)] = T^T [dW, dX]
    dA  = -strict_lower(dWraw W^T + d(beta v) U^T)   (d(M^-1) = -M^-1 dM M^-1, folded: T R = [W U])
    dk += (dA*G*beta + (dA*G*beta)^T) k,   dbeta = rowsum(dA*G*kk) + rowsum(dWraw*exp(b) in k) + rowsum(d(beta v)*v)
    db  = rowsum(Z) - colsum(Z) + rowsum(dqd*qd + dWraw*Wraw - dkd*kd),  Z = dP*P + dA*A,
          db_C += sum(dkd*kd) + sigma sum(S*dS)

Every term is a sum over value columns of per-column products, so the GPU kernel's value blocks
return partial dq, dk, dbeta, db that the wrapper adds. All float32 except the operands of `mm`
(bfloat16 for bfloat16 inputs); everything touching T (inverse, W, U, their gradients) stays float32.
"""

import jax.numpy as jnp
from jax import lax

F32 = jnp.float32
NN = (((1,), (0,)), ((), ()))  # x @ y
NT = (((1,), (1,)), ((), ()))  # x @ y^T
TN = (((0,), (0,)), ((), ()))  # x^T @ y


def dot(x, y, dims=NN, operand_dtype=F32):
    """Matmul with float32 accumulation; float32 operands at full precision (not bf16 passes / TF32)."""
    operand_dtype = jnp.dtype(operand_dtype)
    precision = lax.Precision.HIGHEST if operand_dtype == F32 else None
    return lax.dot_general(x.astype(operand_dtype), y.astype(operand_dtype), dims, precision=precision,
                           preferred_element_type=F32)


def iota(c, axis):
    return lax.broadcasted_iota(jnp.int32, (c, c), axis)


def to_column(row_1xC):
    """[1, C] -> [C, 1] with plain vector ops (select on the diagonal, lane reduction)."""
    c = row_1xC.shape[1]
    return jnp.sum(jnp.where(iota(c, 0) == iota(c, 1), row_1xC, 0.0), axis=1, keepdims=True)


def pair_masks(c: int, count_col=None, count_row=None):
    """([C, C] keep: j <= i in the same segment, [C, C] strict: keep and j < i)."""
    keep = iota(c, 1) <= iota(c, 0)
    if count_col is not None:
        keep = jnp.logical_and(keep, count_col == count_row)
    return keep, jnp.logical_and(keep, iota(c, 1) < iota(c, 0))


def unit_lower_inverse(A):
    """(I + A)^{-1} for strictly lower triangular A [C, C] (any C), float32, by recursive doubling:
    D holds the inverses of the diagonal blocks of size s; with L the below-left s x s blocks of each
    2s block, D - D L D is the inverse at size 2s ([[D11, 0], [-D22 L21 D11, D22]])."""
    c = A.shape[0]
    rows, cols = iota(c, 0), iota(c, 1)
    inverse = jnp.where(rows == cols, 1.0, 0.0).astype(F32)
    s = 1
    while s < c:
        pair = (rows & -(2 * s)) == (cols & -(2 * s))
        other_half = (rows & -s) != (cols & -s)
        L = jnp.where(jnp.logical_and(pair, other_half), A, 0.0)
        inverse = inverse - dot(dot(inverse, L), inverse)
        s *= 2
    return inverse


def chunk_terms(mm, q, k, v, beta, b, b_row, b_last, count_col=None, count_row=None, in_col=None,
                out_col=None, carry=None):
    """What does not depend on the state: q, k [C, K], v [C, BV] float32; beta, b [C, 1]; b_row
    [1, C]; b_last [1, 1]; optional segment counts (column / row) and flags in / out [C, 1], carry
    [1, 1]. `mm` is `dot` with the kernel's operand dtype."""
    c = q.shape[0]
    keep, strict = pair_masks(c, count_col, count_row)
    gamma = jnp.exp(jnp.where(keep, b - b_row, -jnp.inf))
    kk = mm(k, k, NT)
    A = jnp.where(strict, beta * kk * gamma, 0.0)
    T = unit_lower_inverse(A)
    decay_in = jnp.exp(b)
    k_weight = jnp.exp(b_last - b)
    sigma = jnp.exp(b_last)
    if in_col is not None:
        decay_in, k_weight, sigma = decay_in * in_col, k_weight * out_col, sigma * carry
    w_raw = beta * decay_in * k
    beta_v = beta * v
    return dict(q=q, k=k, v=v, beta=beta, strict=strict, gamma=gamma, kk=kk, A=A, T=T,
                decay_in=decay_in, k_weight=k_weight, sigma=sigma, w_raw=w_raw, beta_v=beta_v,
                W=dot(T, w_raw), U=dot(T, beta_v), P=mm(q, k, NT) * gamma)


def forward_chunk(mm, t, state, scale):
    """(o [C, BV] float32, S_new [K, BV]) from chunk_terms `t` and the entering state [K, BV]."""
    X = t["U"] - mm(t["W"], state)
    o = scale * (mm(t["q"] * t["decay_in"], state) + mm(t["P"], X))
    return o, t["sigma"] * state + mm(t["k"] * t["k_weight"], X, TN)


def backward_chunk(mm, t, state, d_new, d_o, scale):
    """Gradients of one chunk: dict of dq, dk [C, K], dv [C, BV], dbeta, db [C, 1] and d_state
    [K, BV] (gradient of the entering state), given the entering state, dS_new and do."""
    c = t["q"].shape[0]
    W, U, T, gamma = t["W"], t["U"], t["T"], t["gamma"]
    X = U - mm(W, state)
    qd = t["q"] * t["decay_in"]
    kd = t["k"] * t["k_weight"]
    dX = scale * mm(t["P"], d_o, TN) + mm(kd, d_new)
    dP = scale * mm(d_o, X, NT)
    dPg = dP * gamma
    dqd = scale * mm(d_o, state, NT)
    dkd = mm(X, d_new, NT)
    d_state = scale * mm(qd, d_o, TN) + t["sigma"] * d_new - mm(W, dX, TN)
    dW = -mm(dX, state, NT)
    d_w_raw = dot(T, dW, TN)
    d_beta_v = dot(T, dX, TN)
    dA = -jnp.where(t["strict"], dot(d_w_raw, W, NT) + dot(d_beta_v, U, NT), 0.0)
    dAg = dA * gamma
    dkk = t["beta"] * dAg
    k, q = t["k"], t["q"]
    dq = mm(dPg, k) + dqd * t["decay_in"]
    dk = (mm(dPg, q, TN) + dkd * t["k_weight"] + mm(dkk, k) + mm(dkk, k, TN)
          + d_w_raw * t["beta"] * t["decay_in"])
    dv = t["beta"] * d_beta_v
    rowsum = lambda x: jnp.sum(x, axis=1, keepdims=True)
    dbeta = rowsum(dAg * t["kk"]) + rowsum(d_w_raw * t["decay_in"] * k) + rowsum(d_beta_v * t["v"])
    Z = dP * t["P"] + dA * t["A"]
    k_term = dkd * kd
    db = (rowsum(Z) - to_column(jnp.sum(Z, axis=0, keepdims=True))
          + rowsum(dqd * qd + d_w_raw * t["w_raw"] - k_term))
    d_last = (jnp.sum(rowsum(k_term), axis=0, keepdims=True)
              + t["sigma"] * jnp.sum(rowsum(state * d_new), axis=0, keepdims=True))  # [1, 1]
    db = db + jnp.where(lax.broadcasted_iota(jnp.int32, (c, 1), 0) == c - 1, d_last, 0.0)
    return dict(dq=dq, dk=dk, dv=dv, dbeta=dbeta, db=db, d_state=d_state)
