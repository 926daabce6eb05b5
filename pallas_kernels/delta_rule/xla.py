"""Chunked gated delta rule in jnp: the CPU path and the fallback everywhere.

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t^T v_t,      o_t = scale * q_t S_t

q, k [B, T, H, K], v [B, T, H, V], beta [B, T, H], g = log_decay None / [B, T, H] (<= 0), state
[B, H, K, V]. The chunked form is the WY / UT representation of DeltaNet's training algorithm
(Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule over Sequence Length",
section 3) with Gated DeltaNet's decay (Yang, Kautz & Hatamizadeh 2024; fla's
chunk_gated_delta_rule). Time is cut into chunks of C tokens; within a chunk, b_i = g_1 + .. + g_i
and, with S the state entering the chunk, the recurrence unrolls to

    S_i = exp(b_i) S + sum_{j <= i} exp(b_i - b_j) k_j^T x_j,     x_j = beta_j (v_j - exp(g_j) k_j S_{j-1})

and substituting S_{j-1} into x_j gives a unit lower triangular system for X [C, V]:

    (I + A) X = beta V - (beta exp(b) K) S,      A_ij = beta_i (k_i . k_j) exp(b_i - b_j)  (j < i)

so X = U - W S with W = (I + A)^{-1} (beta exp(b) K) [C, K] and U = (I + A)^{-1} (beta V) [C, V],
neither of which depends on S. Then

    o     = scale * ((q exp(b)) S + (tril(q K^T exp(b_i - b_j)), diagonal included) X)
    S_new = exp(b_C) S + (K exp(b_C - b))^T X

What does not depend on S (the pairwise decays, A, the inverse of I + A by recursive doubling,
W, U, the scores) runs as batched matmuls over all chunks of a block of BLOCK_TOKENS = 512 tokens
at once; a `lax.scan` over the block's chunks carries S and does the two products with it per
chunk (X = U - W S, S_new), and the outputs then take X and the entering states in batched
products. An outer `lax.scan` over blocks keeps only one block's intermediates live, so the time
per token stays flat in T.

Stability: exp(b_i - b_j) is the exp of a direct sum g_{j+1} + .. + g_i <= 0 (`segsum`), never
exp(b_i) exp(-b_j), which overflows for strong decays (g down to -20 per token); every other
exponent is a sum of log-decays too, so <= 0. With ||k|| <= 1 and beta in [0, 1], |A_ij| <= 1 and
each step's transition exp(g) (I - beta k^T k) is contractive.

Segments: pairs across a segment change contribute nothing (to A and to the scores), the carried
state reaches token i only while no segment has started in the chunk up to it, a token enters the
outgoing state only if no segment starts after it in the chunk, and the state survives a chunk
only if no segment starts in it. These are 0/1 multipliers, so no -inf arithmetic. Time is padded
to a multiple of C with q = k = v = 0, beta = 0, g = 0 and no segment start: padded tokens have
x = 0 and leave the final state unchanged. Gradients come from autodiff of this code, except
through the inverse of I + A, whose backward is the closed form d(M^-1) = -M^-1 dM M^-1.
"""

import math

import jax
import jax.numpy as jnp

from hybrax.pallas_kernels.linear_attention.xla import _suffix_sum, _to_chunks, chunk_segment_masks, segsum

PRECISION = jax.lax.Precision.HIGHEST  # float32 matmuls; TPU/GPU defaults would round to bf16/tf32
BLOCK_TOKENS = 512  # longer sequences are scanned in blocks of about this many tokens (flat time per token)


def _einsum(spec, *operands):
    return jnp.einsum(spec, *operands, precision=PRECISION)


@jax.custom_vjp
def unit_lower_inverse(A):
    """(I + A)^{-1} for strictly lower triangular A [..., C, C], by recursive doubling in matmuls.

    With D the inverses of the diagonal blocks of size s, and L21 the block below-left of each
    pair of them, the inverse of the blocks of size 2s is [[D11, 0], [-D22 L21 D11, D22]] (the
    recursive triangular inversion; each level is exact, not a truncated series). A is zero-padded
    to a power of two P, which leaves its top-left C x C inverse unchanged. Used instead of
    `lax.linalg.triangular_solve`, whose CPU lowering is a LAPACK call per matrix (in our
    benchmark on a loaded 2-core CPU it stalled for minutes at a time): this is plain batched
    matmuls on every backend. The gradient is the matrix-inverse identity (see `_inverse_bwd`),
    not autodiff of the doubling, whose backward was several times slower than the forward.
    """
    C = A.shape[-1]
    P = 1 << (C - 1).bit_length()
    A = jnp.pad(A, [(0, 0)] * (A.ndim - 2) + [(0, P - C), (0, P - C)])
    batch = A.shape[:-2]
    inverse = jnp.ones(batch + (P, 1, 1), A.dtype)  # [..., blocks, s, s], s = 1
    s = 1
    while s < P:
        pairs = P // (2 * s)
        blocks = A.reshape(batch + (pairs, 2 * s, pairs, 2 * s))
        blocks = jnp.moveaxis(jnp.diagonal(blocks, axis1=-4, axis2=-2), -1, -3)  # [..., pairs, 2s, 2s]
        L21 = blocks[..., s:, :s]
        D11, D22 = inverse[..., 0::2, :, :], inverse[..., 1::2, :, :]
        D21 = -_einsum("...ij,...jk,...kl->...il", D22, L21, D11)
        top = jnp.concatenate([D11, jnp.zeros_like(D11)], axis=-1)
        bottom = jnp.concatenate([D21, D22], axis=-1)
        inverse = jnp.concatenate([top, bottom], axis=-2)
        s *= 2
    return inverse.reshape(batch + (P, P))[..., :C, :C]


def _inverse_fwd(A):
    inverse = unit_lower_inverse(A)
    return inverse, inverse


def _inverse_bwd(inverse, d_inverse):
    """d(M^{-1}) = -M^{-1} dM M^{-1} with M = I + A, so dA = -(M^{-T} d_inverse M^{-T}), kept on
    the strictly lower part (the only entries A has)."""
    C = inverse.shape[-1]
    dA = -_einsum("...ji,...jk,...lk->...il", inverse, d_inverse, inverse)
    return (dA * jnp.tril(jnp.ones((C, C), dA.dtype), -1),)


unit_lower_inverse.defvjp(_inverse_fwd, _inverse_bwd)


def delta_rule(q, k, v, beta, log_decay, *, scale, initial_state, segment_ids, return_final_state,
               chunk_size):
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype, beta.dtype, jnp.float32)
    C = min(chunk_size, T)
    N = math.ceil(T / C)
    G = min(N, max(1, BLOCK_TOKENS // C))  # chunks per block
    M = math.ceil(N / G)  # blocks
    N = M * G
    chunks = lambda x: _to_chunks(x.astype(dtype), N, C)  # [B, H, N, C, ...], zero-padded
    inputs = (chunks(q), chunks(k), chunks(v), chunks(beta),
              jnp.zeros((B, H, N, C), dtype) if log_decay is None else chunks(log_decay))

    masks = None if segment_ids is None else chunk_segment_masks(segment_ids, N, C, dtype)

    state_BxHxKxV = (jnp.zeros((B, H, K, V), dtype) if initial_state is None
                     else initial_state.astype(dtype))
    block = lambda state, xs: _block(*xs[0], xs[1], state)
    if M == 1:
        final_BxHxKxV, o_BxHxNxCxV = block(state_BxHxKxV, (inputs, masks))
    else:  # scan over blocks of G chunks: [B, H, N, ...] -> [M, B, H, G, ...] (masks [M, B, G, ...])
        split = lambda x, axis: jnp.moveaxis(x.reshape(x.shape[:axis] + (M, G) + x.shape[axis + 1:]), axis, 0)
        blocks = (tuple(split(x, 2) for x in inputs),
                  None if masks is None else tuple(split(x, 1) for x in masks))
        final_BxHxKxV, o_MxBxHxGxCxV = jax.lax.scan(block, state_BxHxKxV, blocks)
        o_BxHxNxCxV = jnp.moveaxis(o_MxBxHxGxCxV, 0, 2).reshape(B, H, N, C, V)
    o_BxTxHxV = jnp.moveaxis(o_BxHxNxCxV, 1, 3).reshape(B, N * C, H, V)[:, :T]
    o_BxTxHxV = (scale * o_BxTxHxV).astype(v.dtype)
    return o_BxTxHxV, (final_BxHxKxV if return_final_state else None)


def _block(q_BxHxNxCxK, k_BxHxNxCxK, v_BxHxNxCxV, beta_BxHxNxC, g_BxHxNxC, masks, state_BxHxKxV):
    """One block of chunks: (state after the block, unscaled o [B, H, N, C, V])."""
    C, K = k_BxHxNxCxK.shape[3:]
    dtype = k_BxHxNxCxK.dtype
    # Pairwise decays exp(b_i - b_j) (1 above the diagonal, masked below), and the decays from the
    # chunk start to token i (inclusive), from token j to the chunk end (exclusive), of the chunk.
    decay_CxC = jnp.exp(segsum(g_BxHxNxC))
    decay_in = jnp.exp(jnp.cumsum(g_BxHxNxC, axis=3))
    decay_out = jnp.exp(_suffix_sum(g_BxHxNxC, axis=3))
    chunk_decay = jnp.exp(jnp.sum(g_BxHxNxC, axis=3))  # [B, H, N]
    if masks is not None:
        same, reaches, leaves, survives = masks
        decay_CxC = decay_CxC * same[:, None]
        decay_in = decay_in * reaches[:, None]
        decay_out = decay_out * leaves[:, None]
        chunk_decay = chunk_decay * survives[:, None]
    causal_CxC = jnp.tril(jnp.ones((C, C), dtype))
    strictly_causal_CxC = jnp.tril(jnp.ones((C, C), dtype), -1)

    # The UT transform: [W U] = (I + A)^{-1} [beta exp(b) K, beta V] for all chunks at once.
    beta = beta_BxHxNxC[..., None]
    A_CxC = (beta * _einsum("bhnik,bhnjk->bhnij", k_BxHxNxCxK, k_BxHxNxCxK)
             * decay_CxC * strictly_causal_CxC)
    rhs = jnp.concatenate([beta * decay_in[..., None] * k_BxHxNxCxK, beta * v_BxHxNxCxV], axis=-1)
    WU = _einsum("bhnij,bhnjd->bhnid", unit_lower_inverse(A_CxC), rhs)
    W_BxHxNxCxK, U_BxHxNxCxV = WU[..., :K], WU[..., K:]

    # The state-dependent part, chunk by chunk: X = U - W S, S_new = exp(b_C) S + (K exp(b_C - b))^T X.
    k_out = k_BxHxNxCxK * decay_out[..., None]

    def step(state_BxHxKxV, inputs):
        W_BxHxCxK, U_BxHxCxV, k_out_BxHxCxK, decay_BxH = inputs
        X_BxHxCxV = U_BxHxCxV - _einsum("bhck,bhkv->bhcv", W_BxHxCxK, state_BxHxKxV)
        new_BxHxKxV = (decay_BxH[..., None, None] * state_BxHxKxV
                       + _einsum("bhck,bhcv->bhkv", k_out_BxHxCxK, X_BxHxCxV))
        return new_BxHxKxV, (state_BxHxKxV, X_BxHxCxV)

    time_major = lambda x: jnp.moveaxis(x, 2, 0)
    final_BxHxKxV, (entering_NxBxHxKxV, X_NxBxHxCxV) = jax.lax.scan(
        step, state_BxHxKxV, tuple(map(time_major, (W_BxHxNxCxK, U_BxHxNxCxV, k_out, chunk_decay))))

    # o = (q exp(b)) S + scores X, batched over the block's chunks.
    scores = _einsum("bhnik,bhnjk->bhnij", q_BxHxNxCxK, k_BxHxNxCxK) * decay_CxC * causal_CxC
    o_BxHxNxCxV = (_einsum("bhnij,nbhjv->bhniv", scores, X_NxBxHxCxV)
                   + _einsum("bhnik,nbhkv->bhniv", q_BxHxNxCxK * decay_in[..., None], entering_NxBxHxKxV))
    return final_BxHxKxV, o_BxHxNxCxV
