"""Chunked mLSTM in jnp: the CPU path and the fallback everywhere.

    m_t = max(lf_t + m_{t-1}, li_t),    C_t = exp(lf_t + m_{t-1} - m_t) C_{t-1} + exp(li_t - m_t) k_t^T v_t
    n_t likewise with k_t,              h_t = (scale q_t C_t) / max(|scale q_t . n_t|, exp(-m_t))

q, k [B, T, H, K], v [B, T, H, V], li, lf [B, T, H], state (C [B, H, K, V], n [B, H, K], m [B, H]).
The chunked form follows xLSTM's chunkwise kernels (Beck et al. 2025, "xLSTM 7B", appendix;
mlstm_kernels). Two facts make it exact:
- h does not depend on the stabiliser: with raw memory C exp(m), h = scale q C_raw /
  max(|scale q n_raw|, 1). Any per-token stabiliser gives the same h, and dh/dm = 0.
- m_t unrolls to the max of the log-coefficients of everything in the memory: li_j + lf_{j+1} +
  .. + lf_t for each j <= t, and m_0 + lf_1 + .. + lf_t. A max over the same terms, taken chunk by
  chunk, gives the same m, C, n as the recurrence.

Time is cut into chunks of L tokens. With (C, n, m') the state entering a chunk and, for tokens i, j
of the chunk, w_ij = lf_{j+1} + .. + lf_i + li_j (the log-weight of token j at token i, j <= i) and
z_i = lf_1 + .. + lf_i (the decay of the entering state):

    m_i   = max(z_i + m', max_j w_ij)
    num_i = sum_j exp(w_ij - m_i) (scale q_i . k_j) v_j + exp(z_i + m' - m_i) scale q_i C
    den_i = sum_j exp(w_ij - m_i) (scale q_i . k_j)     + exp(z_i + m' - m_i) scale q_i . n
    h_i   = num_i / max(|den_i|, exp(-m_i))

and the state leaving the chunk is row i = L of the same sums. Every exponent is <= 0. The sums of
lf over (j, i] are formed directly (a masked cumulative sum), not as differences of long prefix
sums. The intra-chunk sums run as batched matmuls over all chunks of a block of BLOCK_TOKENS = 512
tokens; a `lax.scan` passes the state between the chunks of a block and an outer `lax.scan` between
blocks, so the working set, and the time per token, stay flat in T.

Gradients come from autodiff. The stabilisers enter every exponent through stop_gradient (exact,
as h does not depend on them; it also keeps roundoff from flowing through them). The state's C and
n are then C_raw exp(-m) with m held fixed, so the final state gets the m-dependence back as C
exp(stop_gradient(m) - m), with m computed differentiably: a max whose gradient goes to the newest
of tied terms, as in the reference.

Segments: token j reaches token i only within i's segment; the entering state reaches token i only
if no segment starts in the chunk up to i; otherwise the zero state entered at i's segment start
s, with m = 0, and its term in the max is lf_s + .. + lf_i. All are masks on the exponent before
exp (masked entries are exp(-inf) = 0, with zero gradient), never -inf arithmetic. Time is padded
to a multiple of L with k = v = 0, lf = 0 and li masked out, which leaves the final state unchanged.
"""

import math

import jax
import jax.numpy as jnp

PRECISION = jax.lax.Precision.HIGHEST  # float32 matmuls; TPU/GPU defaults would round to bf16/tf32
BLOCK_TOKENS = 512  # longer sequences are scanned in blocks of about this many tokens (flat time per token)

_sg = jax.lax.stop_gradient


def _einsum(spec, *operands):
    return jnp.einsum(spec, *operands, precision=PRECISION)


def decay_sums(lf):
    """[..., L] -> [..., L, L + 1]: out[i, j] = lf_j + .. + lf_i for j <= i, 0 for j > i, summed
    directly (a masked cumulative sum). So out[i, j + 1] is the decay from token j to token i.
    For lf <= 0 it is monotone in j, so newer terms never round below older ones."""
    L = lf.shape[-1]
    from_j = jnp.arange(L)[:, None] >= jnp.arange(L + 1)[None, :]  # [m, j]: m >= j
    terms = jnp.where(from_j, lf[..., :, None], 0.0)  # [..., m, j] = lf_m [m >= j]
    return jnp.cumsum(terms, axis=-2)  # [..., i, j] = sum_{m <= i} lf_m [m >= j]


def newest_max(x, valid):
    """(max over the last axis of x where valid, whether any is valid). Differentiable, the
    gradient going to one entry, the newest (last) of tied maxima, like the reference's
    recurrence. 0 where nothing is valid."""
    L = x.shape[-1]
    top = jnp.max(jnp.where(valid, _sg(x), -jnp.inf), axis=-1, keepdims=True)
    hit = valid & (_sg(x) == top)
    last = L - 1 - jnp.argmax(jnp.flip(hit, -1), axis=-1)
    pick = (jnp.arange(L) == last[..., None]) & valid
    return jnp.sum(jnp.where(pick, x, 0.0), axis=-1), jnp.any(valid, axis=-1)


def _to_chunks(x, N, L):
    """[B, T, H, ...] -> [B, H, N, L, ...], zero-padding time to N * L."""
    B, T = x.shape[:2]
    x = jnp.pad(x, [(0, 0), (0, N * L - T)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape((B, N, L) + x.shape[2:])
    return jnp.moveaxis(x, 3, 1)


def _masks(segment_ids, B, T, N, L):
    """0/1 masks [B or 1, N, ...]: feeds [L, L] (token j reaches token i: j <= i, same segment, j
    not padding), reaches [L] (the entering state reaches token i), first [L, L] (j is the first
    token of i's segment within the chunk) and valid [L] (not padding)."""
    if segment_ids is None:
        segment_BxNxL = jnp.zeros((1, N, L), jnp.int32)
    else:
        starts_BxT = jnp.concatenate(
            [jnp.zeros((B, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
        segment_BxT = jnp.cumsum(starts_BxT, axis=1, dtype=jnp.int32)
        segment_BxT = jnp.pad(segment_BxT, [(0, 0), (0, N * L - T)], mode="edge")  # no start in padding
        segment_BxNxL = segment_BxT.reshape(B, N, L)
    entering_BxN = jnp.concatenate([segment_BxNxL[:, :1, 0], segment_BxNxL[:, :-1, -1]], axis=1)
    same = segment_BxNxL[..., :, None] == segment_BxNxL[..., None, :]  # [B, N, i, j]
    causal_LxL = jnp.arange(L)[:, None] >= jnp.arange(L)[None, :]
    valid_NxL = (jnp.arange(N * L) < T).reshape(N, L)
    feeds = same & causal_LxL & valid_NxL[:, None, :]
    reaches = segment_BxNxL == entering_BxN[..., None]
    is_first = jnp.concatenate([jnp.ones_like(segment_BxNxL[..., :1], bool),
                                segment_BxNxL[..., 1:] != segment_BxNxL[..., :-1]], axis=-1)
    first = same & causal_LxL & is_first[..., None, :]
    return feeds, reaches, first, valid_NxL[None]


def mlstm(q, k, v, log_input_gate, log_forget_gate, *, scale, initial_state, segment_ids,
          return_final_state, chunk_size):
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtypes = [q.dtype, k.dtype, v.dtype, log_input_gate.dtype, log_forget_gate.dtype, jnp.float32]
    if initial_state is not None:
        dtypes += [x.dtype for x in initial_state]
    dtype = jnp.result_type(*dtypes)
    L = min(chunk_size, T)
    N = math.ceil(T / L)
    G = min(N, max(1, BLOCK_TOKENS // L))  # chunks per block
    M = math.ceil(N / G)  # blocks
    N = M * G
    chunks = lambda x: _to_chunks(x.astype(dtype), N, L)  # [B, H, N, L, ...], zero-padded
    inputs = tuple(chunks(x) for x in (q, k, v, log_input_gate, log_forget_gate))
    masks = _masks(segment_ids, B, T, N, L)

    if initial_state is None:
        c_BxHxKxV, n_BxHxK, m_BxH = (jnp.zeros((B, H, K, V), dtype), jnp.zeros((B, H, K), dtype),
                                     jnp.zeros((B, H), dtype))
    else:
        c_BxHxKxV, n_BxHxK, m_BxH = (x.astype(dtype) for x in initial_state)
        # Below, stabilisers are constants to autodiff; the raw memory C exp(m) keeps its m-dependence.
        c_BxHxKxV = c_BxHxKxV * jnp.exp(m_BxH - _sg(m_BxH))[..., None, None]
        n_BxHxK = n_BxHxK * jnp.exp(m_BxH - _sg(m_BxH))[..., None]
    state = (c_BxHxKxV, n_BxHxK, m_BxH)

    block = lambda state, xs: _block(*xs[0], *xs[1], state, scale)
    if M == 1:
        state, h_BxHxNxLxV = block(state, (inputs, masks))
    else:  # scan over blocks of G chunks: [B, H, N, ...] -> [M, B, H, G, ...] (masks [M, B, G, ...])
        split = lambda x, axis: jnp.moveaxis(x.reshape(x.shape[:axis] + (M, G) + x.shape[axis + 1:]), axis, 0)
        blocks = (tuple(split(x, 2) for x in inputs), tuple(split(x, 1) for x in masks))
        state, h_MxBxHxGxLxV = jax.lax.scan(block, state, blocks)
        h_BxHxNxLxV = jnp.moveaxis(h_MxBxHxGxLxV, 0, 2).reshape(B, H, N, L, V)
    h_BxTxHxV = jnp.moveaxis(h_BxHxNxLxV, 1, 3).reshape(B, N * L, H, V)[:, :T].astype(v.dtype)
    if not return_final_state:
        return h_BxTxHxV, None
    c_BxHxKxV, n_BxHxK, m_BxH = state
    # C and n were carried as C_raw exp(-m) with m held fixed: restore d/dm (the value is unchanged).
    rescale_BxH = jnp.exp(_sg(m_BxH) - m_BxH)
    return h_BxTxHxV, (c_BxHxKxV * rescale_BxH[..., None, None], n_BxHxK * rescale_BxH[..., None], m_BxH)


def _block(q, k, v, li, lf, feeds, reaches, first, valid, state, scale):
    """One block of G chunks: q, k [B, H, G, L, K], v [B, H, G, L, V], li, lf [B, H, G, L]; masks
    [B or 1, G, ...]. Returns (the state after the block, h [B, H, G, L, V])."""
    L = q.shape[3]
    feeds, reaches, first, valid = (x[:, None] for x in (feeds, reaches, first, valid))  # over heads
    sums = decay_sums(lf)  # [B, H, G, L, L + 1]
    w = sums[..., 1:] + li[..., None, :]  # [B, H, G, i, j]: log-weight of token j at token i
    # Decay of the state entering at i's segment start (the chunk start if no segment starts).
    z = jnp.sum(jnp.where(first, sums[..., :L], 0.0), axis=-1)  # [B, H, G, L]
    intra_max = jnp.max(jnp.where(feeds, _sg(w), -jnp.inf), axis=-1)  # -inf: nothing feeds

    # Each chunk's own contribution to its end state, stabilised by its own max (differentiable:
    # it may end up as the final state's m).
    local_m, has_any = newest_max(w[..., -1, :], feeds[..., -1, :])  # [B, H, G]
    a = jnp.exp(jnp.where(feeds[..., -1, :], w[..., -1, :] - _sg(local_m)[..., None], -jnp.inf))
    update_c = _einsum("bhgjk,bhgjv->bhgkv", k * a[..., None], v)
    update_n = jnp.sum(k * a[..., None], axis=3)
    z_end, survives = z[..., -1], reaches[..., -1]
    has_any = jnp.broadcast_to(has_any, local_m.shape)
    survives = jnp.broadcast_to(survives, local_m.shape)

    def step(state, xs):
        c, n, m = state
        update_c, update_n, local_m, has_any, z_end, survives = xs
        m_carried = z_end + jnp.where(survives, m, 0.0)  # the zero state has m = 0
        m_new = jnp.where(has_any & (local_m >= m_carried), local_m, m_carried)  # a tie goes to the newer
        f = jnp.exp(jnp.where(survives, z_end + _sg(m) - _sg(m_new), -jnp.inf))
        i = jnp.exp(jnp.where(has_any, _sg(local_m) - _sg(m_new), -jnp.inf))
        c_new = f[..., None, None] * c + i[..., None, None] * update_c
        n_new = f[..., None] * n + i[..., None] * update_n
        return (c_new, n_new, m_new), (c, n, _sg(m))

    to_scan = lambda x: jnp.moveaxis(x, 2, 0)
    state, (c_in, n_in, m_in) = jax.lax.scan(
        step, state, tuple(map(to_scan, (update_c, update_n, local_m, has_any, z_end, survives))))
    c_in, n_in, m_in = (jnp.moveaxis(x, 0, 2) for x in (c_in, n_in, m_in))  # state entering each chunk

    # Outputs: per-token stabiliser (a constant to autodiff), then the intra- and inter-chunk sums.
    carried = _sg(z) + jnp.where(reaches, m_in[..., None], 0.0)
    m_i = jnp.maximum(carried, intra_max)  # [B, H, G, L]
    e = jnp.exp(jnp.where(reaches, z + m_in[..., None] - m_i, -jnp.inf))
    p = jnp.exp(jnp.where(feeds, w - m_i[..., None], -jnp.inf))
    scores = scale * _einsum("bhgik,bhgjk->bhgij", q, k) * p
    q_in = scale * q * e[..., None]
    num = _einsum("bhgij,bhgjv->bhgiv", scores, v) + _einsum("bhgik,bhgkv->bhgiv", q_in, c_in)
    den = jnp.sum(scores, axis=-1) + jnp.sum(q_in * n_in[..., None, :], axis=-1)
    # Padding has q = 0, so num = den = 0 and the floor exp(-m) may be subnormal: 1 / floor^2 in
    # the backward pass would overflow (0 * inf = NaN). Its output is dropped: divide by 1 there.
    denominator = jnp.where(valid, _denominator(den, m_i), 1.0)
    return state, num / denominator[..., None]


def _denominator(den, m):
    """max(|den|, exp(-m)), or 1 where that is 0: exp(-m) underflows for m > ~100 (positive lf over
    long spans), and with q = 0 (padding) h = 0 / 0; its value there is 0, and the backward pass
    must not see 1 / 0."""
    floor = jnp.maximum(jnp.abs(den), jnp.exp(-m))
    return jnp.where(floor > 0, floor, 1.0)
