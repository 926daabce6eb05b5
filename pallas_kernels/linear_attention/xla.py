"""Chunked linear attention with decay in jnp: the CPU path and the fallback everywhere.

    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,      o_t = scale * q_t S_t

q, k [B, T, H, K], v [B, T, H, V], g = log_decay None / [B, T, H] / [B, T, H, K] (<= 0), state
[B, H, K, V]. The chunked form (GLA, Yang et al. 2023, "Gated Linear Attention Transformers with
Hardware-Efficient Training", section 4; Mamba-2 SSD, Dao & Gu 2024) cuts time into chunks of C
tokens. With S the state entering a chunk, for tokens i, j of the chunk:

    o_i   = scale * (sum_{j <= i} (q_i * exp(g_{j+1} + .. + g_i)) . k_j  v_j  +  (q_i * exp(g_1 + .. + g_i)) S)
    S_new = diag(exp(g_1 + .. + g_C)) S + sum_j (k_j * exp(g_{j+1} + .. + g_C))^T v_j

The intra-chunk sums run as batched matmuls over all chunks of a block of BLOCK_TOKENS = 512
tokens at once; the state is passed between chunks by a `lax.scan` that carries [B, H, K, V], and
between blocks by an outer `lax.scan`. Only one block's intermediates (and its chunk-entering
states) are live at a time, so the working set, and the time per token, stay flat in T.

Stability: every exponential is of a sum of log-decays that is <= 0, or bounded as below, so
nothing overflows. Sums over (j, i] are formed as direct sums (a masked cumulative sum, the
"segsum" of Mamba-2), not as differences of long prefix sums, where a difference could lose
precision. Per-channel gates make the intra-chunk decay depend on the channel, and two forms
compute the intra-chunk scores:
- factored (fast, one matmul): exp(b_i - b_j) = exp(b_i - m) exp(m - b_j), b the within-chunk
  cumulative log-decay and m the middle of its range; used when every chunk's per-channel decay
  span -(g_1 + .. + g_C) is <= FACTORED_SPAN = 40, so every factor and product stays below
  exp(40). Typical learned gates (GLA's log-sigmoid / 16) are far inside this; a smaller chunk
  keeps stronger gates on this path.
- exact (any gates, several times slower): GLA's secondary chunking into sub-chunks of c <= 16
  tokens: pairs within a sub-chunk use the full [c, c, K] decay tensor, pairs across sub-chunks
  factor through the sub-chunk boundaries, each factor an exp of a sum <= 0.
One `lax.cond` per block picks the form.

Segments: a token sees only earlier tokens of its own segment, the carried state reaches a token
only while no segment has started in the chunk up to it, a token enters the outgoing state only if
no segment starts after it in the chunk, and the state survives a chunk only if no segment starts
in it. These are 0/1 multipliers, so no -inf arithmetic. Time is padded to a multiple of C with
q = k = v = 0, g = 0 and no segment start, which leaves the final state unchanged. Gradients come
from autodiff of this code.
"""

import math

import jax
import jax.numpy as jnp

PRECISION = jax.lax.Precision.HIGHEST  # float32 matmuls; TPU/GPU defaults would round to bf16/tf32
SUB_CHUNK = 16
BLOCK_TOKENS = 512  # longer sequences are scanned in blocks of about this many tokens (flat time per token)
FACTORED_SPAN = 40.0  # exp(40) ~ 2e17: factored products stay far from float32 overflow


def _einsum(spec, *operands):
    return jnp.einsum(spec, *operands, precision=PRECISION)


def segsum(g):
    """[..., L] -> [..., L, L] with out[i, j] = g_{j+1} + .. + g_i for j <= i (0 on and above the
    diagonal's upper side), summed directly so no two large prefix sums are subtracted."""
    L = g.shape[-1]
    strictly_below = jnp.arange(L)[:, None] > jnp.arange(L)[None, :]  # [m, j]: m > j
    terms = jnp.where(strictly_below, g[..., :, None], 0.0)  # [..., m, j] = g_m [m > j]
    return jnp.cumsum(terms, axis=-2)  # [..., i, j] = sum_{m <= i} g_m [m > j]


def _suffix_sum(g, axis):
    """out_j = g_{j+1} + .. + g_last along `axis` (exclusive reverse cumulative sum)."""
    rev = jnp.flip(jnp.cumsum(jnp.flip(g, axis), axis=axis), axis)  # sum_{m >= j}
    rev = jnp.moveaxis(rev, axis, -1)
    out = jnp.concatenate([rev[..., 1:], jnp.zeros_like(rev[..., :1])], axis=-1)
    return jnp.moveaxis(out, -1, axis)


def _sub_chunk(C: int) -> int:
    """Largest divisor of C that is <= SUB_CHUNK."""
    return max(d for d in range(1, min(C, SUB_CHUNK) + 1) if C % d == 0)


def _to_chunks(x, N, C):
    """[B, T, H, ...] -> [B, H, N, C, ...], zero-padding time to N * C."""
    B, T = x.shape[:2]
    x = jnp.pad(x, [(0, 0), (0, N * C - T)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape((B, N, C) + x.shape[2:])
    return jnp.moveaxis(x, 3, 1)


def _per_channel_scores_exact(q, k, g, c):
    """Decay-weighted causal scores [B, H, N, C, C] for per-channel gates, by secondary chunking,
    stable for any gates: score[i, j] = sum_k q_ik k_jk exp(g_{j+1,k} + .. + g_{i,k}) for j <= i."""
    B, H, N, C, K = q.shape
    S = C // c
    q_s, k_s, g_s = (x.reshape(B, H, N, S, c, K) for x in (q, k, g))
    # Within a sub-chunk: the full pairwise decay tensor [c, c, K].
    causal_cxc = jnp.tril(jnp.ones((c, c), q.dtype))
    decay_cxcxK = jnp.exp(segsum(jnp.moveaxis(g_s, -1, -2)))  # [B, H, N, S, K, c, c]
    decay_cxcxK = jnp.moveaxis(decay_cxcxK, -3, -1) * causal_cxc[:, :, None]
    scores = _einsum("bhnsik,bhnsjk,bhnsijk->bhnsij", q_s, k_s, decay_cxcxK)
    eye_SxS = jnp.eye(S, dtype=q.dtype)
    scores = _einsum("bhnsij,st->bhnsitj", scores, eye_SxS)  # on the block diagonal
    if S > 1:
        # Across sub-chunks t < s: exp(sum over (j, i]) = exp(sum within s up to i)
        #   * exp(sum of the whole sub-chunks strictly between) * exp(sum within t after j).
        q_in = q_s * jnp.exp(jnp.cumsum(g_s, axis=-2))
        k_out = k_s * jnp.exp(_suffix_sum(g_s, axis=-2))
        total_SxK = jnp.sum(g_s, axis=-2)  # [B, H, N, S, K]
        idx = jnp.arange(S)
        between = ((idx[None, :, None] < idx[None, None, :])  # [s, t, m]: t < m < s
                   & (idx[None, None, :] < idx[:, None, None])).astype(q.dtype)
        middle = _einsum("bhnmk,stm->bhnstk", total_SxK, between)
        earlier = (idx[None, :] < idx[:, None]).astype(q.dtype)  # [s, t]: t < s
        weight = jnp.exp(middle) * earlier[:, :, None]
        scores = scores + _einsum("bhnsik,bhnstk,bhntjk->bhnsitj", q_in, weight, k_out)
    return scores.reshape(B, H, N, C, C)


def _per_channel_factored(q, k, g):
    """Intra-chunk scores as one matmul: exp(b_i - b_j) = exp(b_i - m) exp(m - b_j) with b the
    within-chunk cumulative log-decay and m = b_C / 2 the middle of its range, per chunk and
    channel. Every factor is at most exp(span / 2) and every product at most exp(span), span =
    -(g_1 + .. + g_C): finite and accurate while span <= FACTORED_SPAN. The decayed q and k of the
    inter-chunk part reuse the factors: q exp(b) = (q exp(b - m)) exp(m), k exp(b_C - b) =
    (k exp(m - b)) exp(m)."""
    b = jnp.cumsum(g, axis=3)  # [B, H, N, C, K]
    # Every result is independent of m, so its gradient is exactly zero; stopping it keeps
    # roundoff from carrying later gates of the chunk into earlier outputs' gradients.
    last = b[:, :, :, -1:, :]
    middle = jax.lax.stop_gradient(0.5 * last)
    q_factor, k_factor = q * jnp.exp(b - middle), k * jnp.exp(middle - b)
    C = q.shape[3]
    scores = _einsum("bhnik,bhnjk->bhnij", q_factor, k_factor) * jnp.tril(jnp.ones((C, C), q.dtype))
    # k exp(b_C - b) = (k exp(m - b)) exp(b_C - m): written with b_C itself, whose gradient counts.
    return scores, q_factor * jnp.exp(middle), k_factor * jnp.exp(last - middle)


def _per_channel_exact(q, k, g, c):
    return (_per_channel_scores_exact(q, k, g, c), q * jnp.exp(jnp.cumsum(g, axis=3)),
            k * jnp.exp(_suffix_sum(g, axis=3)))


def _per_channel(q, k, g, c):
    """(scores [B, H, N, C, C], q * exp(b), k * exp(b_C - b)) for per-channel gates: factored (matmul
    speed) when every chunk's decay span allows it, exact otherwise (one decision per call or
    block of BLOCK_TOKENS)."""
    # The exact branch is rematerialised in the backward pass: a cond's residuals are the union
    # over its branches, so its [c, c, K] tensors would otherwise be stored (as zeros) even when
    # the factored branch runs.
    span = -jnp.min(jnp.sum(g, axis=3))
    exact = jax.checkpoint(lambda q, k, g: _per_channel_exact(q, k, g, c))
    return jax.lax.cond(span <= FACTORED_SPAN, _per_channel_factored, exact, q, k, g)


def chunk_segment_masks(segment_ids, N: int, C: int, dtype):
    """The 0/1 segment multipliers of the module docstring for time cut into N chunks of C
    (padding continues the last segment): (same segment [B, N, C, C], the carried state reaches
    token i [B, N, C], token j enters the outgoing state [B, N, C], the state survives the chunk
    [B, N])."""
    B, T = segment_ids.shape
    starts_BxT = jnp.concatenate([jnp.zeros((B, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    segment_BxT = jnp.cumsum(starts_BxT, axis=1, dtype=jnp.int32)
    segment_BxT = jnp.pad(segment_BxT, [(0, 0), (0, N * C - T)], mode="edge")
    segment_BxNxC = segment_BxT.reshape(B, N, C)
    entering_BxN = jnp.concatenate([segment_BxNxC[:, :1, 0], segment_BxNxC[:, :-1, -1]], axis=1)
    return ((segment_BxNxC[:, :, :, None] == segment_BxNxC[:, :, None, :]).astype(dtype),  # same
            (segment_BxNxC == entering_BxN[:, :, None]).astype(dtype),  # state -> token i
            (segment_BxNxC == segment_BxNxC[:, :, -1:]).astype(dtype),  # token j -> state
            (segment_BxNxC[:, :, -1] == entering_BxN).astype(dtype))  # state -> next chunk


def linear_attention(q, k, v, log_decay, *, scale, initial_state, segment_ids, return_final_state,
                     chunk_size):
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype, jnp.float32)
    C = min(chunk_size, T)
    N = math.ceil(T / C)
    G = min(N, max(1, BLOCK_TOKENS // C))  # chunks per block
    M = math.ceil(N / G)  # blocks
    N = M * G
    chunks = lambda x: _to_chunks(x.astype(dtype), N, C)  # [B, H, N, C, ...], zero-padded
    q_BxHxNxCxK, k_BxHxNxCxK, v_BxHxNxCxV = chunks(q), chunks(k), chunks(v)
    g = jnp.zeros((B, H, N, C), dtype) if log_decay is None else chunks(log_decay)

    masks = None if segment_ids is None else chunk_segment_masks(segment_ids, N, C, dtype)

    state_BxHxKxV = (jnp.zeros((B, H, K, V), dtype) if initial_state is None
                     else initial_state.astype(dtype))
    inputs = (q_BxHxNxCxK, k_BxHxNxCxK, v_BxHxNxCxV, g)
    block = lambda state, xs: _block(*xs[0], xs[1], state, log_decay)
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


def _block(q_BxHxNxCxK, k_BxHxNxCxK, v_BxHxNxCxV, g, masks, state_BxHxKxV, log_decay):
    """One block of chunks: (state after the block, unscaled o [B, H, N, C, V])."""
    C = q_BxHxNxCxK.shape[3]
    dtype = q_BxHxNxCxK.dtype
    # Intra-chunk scores, and q, k decayed from the chunk start to token i (inclusive) and from
    # token j to the chunk end (exclusive) for the inter-chunk part.
    if log_decay is not None and log_decay.ndim == 4:
        scores, q_in, k_out = _per_channel(q_BxHxNxCxK, k_BxHxNxCxK, g, _sub_chunk(C))
        chunk_decay = jnp.exp(jnp.sum(g, axis=3))[..., None]  # [B, H, N, K, 1]
    else:
        causal_CxC = jnp.tril(jnp.ones((C, C), dtype))
        decay_CxC = jnp.exp(segsum(g)) * causal_CxC if log_decay is not None else causal_CxC
        scores = _einsum("bhnik,bhnjk->bhnij", q_BxHxNxCxK, k_BxHxNxCxK) * decay_CxC
        q_in = q_BxHxNxCxK * jnp.exp(jnp.cumsum(g, axis=3))[..., None]
        k_out = k_BxHxNxCxK * jnp.exp(_suffix_sum(g, axis=3))[..., None]
        chunk_decay = jnp.exp(jnp.sum(g, axis=3))[..., None, None]  # [B, H, N, 1, 1]
    if masks is not None:
        same, reaches, leaves, survives = masks
        scores = scores * same[:, None]
        q_in = q_in * reaches[:, None, :, :, None]
        k_out = k_out * leaves[:, None, :, :, None]
        chunk_decay = chunk_decay * survives[:, None, :, None, None]

    o_BxHxNxCxV = _einsum("bhnij,bhnjv->bhniv", scores, v_BxHxNxCxV)

    # Inter-chunk: each chunk's own contribution to the state, then a scan passes the state on.
    update_BxHxNxKxV = _einsum("bhnjk,bhnjv->bhnkv", k_out, v_BxHxNxCxV)

    def step(state_BxHxKxV, inputs):
        decay, update_BxHxKxV = inputs
        return decay * state_BxHxKxV + update_BxHxKxV, state_BxHxKxV

    final_BxHxKxV, entering_NxBxHxKxV = jax.lax.scan(
        step, state_BxHxKxV, (jnp.moveaxis(chunk_decay, 2, 0), jnp.moveaxis(update_BxHxNxKxV, 2, 0)))
    o_BxHxNxCxV = o_BxHxNxCxV + _einsum("bhnik,nbhkv->bhniv", q_in, entering_NxBxHxKxV)
    return final_BxHxKxV, o_BxHxNxCxV
