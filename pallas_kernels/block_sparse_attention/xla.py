"""Block-sparse softmax attention in jnp by gathering the listed key blocks: the CPU path and the
fallback everywhere. Memory and time grow with n_sel, not with S.

Block-sparse attention as in MoBA (Lu et al. 2025, "MoBA: Mixture of Block Attention for
Long-Context LLMs") and NSA's selected branch (Yuan et al. 2025, "Native Sparse Attention"): query
block n (rows [n bq, (n + 1) bq)) reads only the key blocks m listed in `block_indices[b, h, n]`.

Layout: every (batch b, query head h, query block n) is one "row" r of R = B H nq rows. Keys and
values are cut into blocks `[B Hkv nk, bk, D]` (flat), and row r gathers its n_sel blocks from
the kv head h // (H / Hkv) directly (K is never repeated per query head):

    K_r = k_blocks[flat(r, s)]                               [n_sel, bk, D]
    s_r = scale q_r K_r^T                                    [bq, n_sel bk]   (float32)
    p_r = softmax over the visible keys, 0 elsewhere;        o_r = p_r V_r    [bq, D]

Query row i of block n sits at position query_blocks[n] bq + i (n bq + i by default: the queries
may be a subset of the positions, e.g. one device's rows under sequence parallelism); key j at j.
A key (slot s, position j) is visible to query i when the slot is used (index >= 0), is the first
slot of its row holding that block (duplicates count once), the key is a real key (< S), and
(causal) the query's position >= j and (segments) same segment (kv_segment_ids for the keys when
given). Rows with no visible key give o = 0.

Rows are processed in chunks of about SCORE_BUDGET score elements by `lax.map`/`lax.scan`, so at
T = 8k, n_sel = 16, blocks of 64 the scores live at a time take about 1 MB (4 rows; smaller chunks
measured faster on a CPU than larger ones: they stay in cache). Gradients come from a `custom_vjp`
(flash-attention style, Dao et al. 2022): the forward saves only the row logsumexp
l = m + log sum exp(s - m) besides its inputs; the backward recomputes p = exp(s - l) chunk by chunk,

    dp = do V^T,   ds = p (dp - rowsum(p dp)),   dq = scale ds K,   dK = scale ds^T q,   dV = p^T do

(rowsum(p dp) = rowsum(do o), but exactly 0 for a row that sees a single key, as autodiff gives)

and scatter-adds dK, dV into the key blocks (a float32 carry of the scan). bfloat16 inputs use
bfloat16 matmul operands with float32 accumulation; softmax statistics are float32.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

SCORE_BUDGET = 1 << 18  # score elements per chunk of rows (1 MB in float32: stays in cache)
NEG = -1e30  # finite "minus infinity": exp(NEG - m) == 0 for any finite row max m


@dataclasses.dataclass(frozen=True)
class _Config:
    block_q: int
    block_k: int
    causal: bool
    scale: float
    kv_len: int  # S, real keys; positions >= S are padding
    pad_keys: bool  # S is not a multiple of block_k
    segments: bool
    num_chunks: int


def _dot(spec, a, b):
    """einsum with float32 accumulation; float32 operands stay float32 on every backend."""
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jnp.einsum(spec, a, b, precision=precision, preferred_element_type=jnp.float32)


def _gather_blocks(x_Mxbk, flat_cxN):
    return jnp.take(x_Mxbk, flat_cxN, axis=0, mode="clip")


def _visible(cfg: _Config, rows, segk_M):
    """Boolean [c, bq, n_sel, bk]: which gathered key each query row of the chunk may see."""
    qblock_c, idx_cxN, used_cxN, flat_cxN, segq_cxbq = rows
    bq, bk = cfg.block_q, cfg.block_k
    visible = used_cxN[:, None, :, None]  # [c, 1, N, 1]
    key_pos_cxNxbk = idx_cxN[:, :, None] * bk + jnp.arange(bk)
    if cfg.pad_keys:
        visible = visible & (key_pos_cxNxbk < cfg.kv_len)[:, None]
    if cfg.causal:
        q_pos_cxbq = qblock_c[:, None] * bq + jnp.arange(bq)
        visible = visible & (q_pos_cxbq[:, :, None, None] >= key_pos_cxNxbk[:, None])
    if cfg.segments:
        segk_cxNxbk = _gather_blocks(segk_M, flat_cxN)
        visible = visible & (segq_cxbq[:, :, None, None] == segk_cxNxbk[:, None])
    return visible


def _scores(cfg, q_cxbqxD, k_cxNxbkxD, visible):
    s = _dot("cqd,cnkd->cqnk", q_cxbqxD, k_cxNxbkxD) * cfg.scale
    return jnp.where(visible, s, NEG)


def _forward_chunk(cfg, k_M, v_M, segk_M, q_cxbqxD, rows):
    """(o [c, bq, D] float32, logsumexp [c, bq]; rows with nothing visible: o = 0, lse = 0)."""
    flat_cxN = rows[3]
    k_cxNxbkxD, v_cxNxbkxD = _gather_blocks(k_M, flat_cxN), _gather_blocks(v_M, flat_cxN)
    visible = _visible(cfg, rows, segk_M)
    s = _scores(cfg, q_cxbqxD, k_cxNxbkxD, visible)
    m_cxbq = jnp.max(s, axis=(2, 3))
    m_cxbq = jnp.where(m_cxbq > 0.5 * NEG, m_cxbq, 0.0)  # empty rows: every p below is exp(NEG) = 0
    p = jnp.exp(s - m_cxbq[:, :, None, None])
    l_cxbq = jnp.sum(p, axis=(2, 3))
    o_cxbqxD = _dot("cqnk,cnkd->cqd", p.astype(v_M.dtype), v_cxNxbkxD)
    nonempty = l_cxbq > 0
    o_cxbqxD = o_cxbqxD * jnp.where(nonempty, 1.0 / jnp.where(nonempty, l_cxbq, 1.0), 0.0)[:, :, None]
    lse_cxbq = jnp.where(nonempty, m_cxbq + jnp.log(jnp.where(nonempty, l_cxbq, 1.0)), 0.0)
    return o_cxbqxD, lse_cxbq


def _backward_chunk(cfg, k_M, v_M, segk_M, q_cxbqxD, rows, lse_cxbq, do_cxbqxD):
    """(dq [c, bq, D] float32, dK, dV [c, n_sel, bk, D] float32 per gathered block)."""
    flat_cxN = rows[3]
    k_cxNxbkxD, v_cxNxbkxD = _gather_blocks(k_M, flat_cxN), _gather_blocks(v_M, flat_cxN)
    visible = _visible(cfg, rows, segk_M)
    s = _scores(cfg, q_cxbqxD, k_cxNxbkxD, visible)
    p = jnp.exp(s - lse_cxbq[:, :, None, None])  # masked keys: exp(NEG - lse) = 0
    dv = _dot("cqnk,cqd->cnkd", p.astype(do_cxbqxD.dtype), do_cxbqxD)
    dp = _dot("cqd,cnkd->cqnk", do_cxbqxD, v_cxNxbkxD)
    # rowsum(do o) as rowsum(p dp): the same number, but exactly 0 where a row sees one key
    delta_cxbq = jnp.sum(p * dp, axis=(2, 3))
    ds = (p * (dp - delta_cxbq[:, :, None, None]) * cfg.scale).astype(q_cxbqxD.dtype)
    dq = _dot("cqnk,cnkd->cqd", ds, k_cxNxbkxD)
    dk = _dot("cqnk,cqd->cnkd", ds, q_cxbqxD)
    return dq, dk, dv


def _chunked(x, num_chunks):
    return x.reshape((num_chunks, x.shape[0] // num_chunks) + x.shape[1:])


def _unchunked(x):
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(cfg, q_RxbqxD, k_M, v_M, segk_M, rows):
    return _attend_fwd(cfg, q_RxbqxD, k_M, v_M, segk_M, rows)[0]


def _attend_fwd(cfg, q_RxbqxD, k_M, v_M, segk_M, rows):
    chunk = lambda xs: _forward_chunk(cfg, k_M, v_M, segk_M, *xs)
    if cfg.num_chunks == 1:
        o, lse = chunk((q_RxbqxD, rows))
    else:
        chunks = jax.tree.map(lambda x: _chunked(x, cfg.num_chunks), (q_RxbqxD, rows))
        o, lse = jax.tree.map(_unchunked, jax.lax.map(chunk, chunks))
    o = o.astype(q_RxbqxD.dtype)
    return o, (q_RxbqxD, k_M, v_M, segk_M, rows, lse)


def _attend_bwd(cfg, residuals, do_RxbqxD):
    q_RxbqxD, k_M, v_M, segk_M, rows, lse = residuals
    zeros = jnp.zeros(k_M.shape, jnp.float32)

    def step(carry, xs):
        dk_M, dv_M = carry
        rows_c = xs[1]
        dq, dk, dv = _backward_chunk(cfg, k_M, v_M, segk_M, *xs)
        flat_cxN = rows_c[3]  # unused slots hold p = 0, so their (clipped) blocks receive zeros
        return (dk_M.at[flat_cxN].add(dk, mode="drop"), dv_M.at[flat_cxN].add(dv, mode="drop")), dq

    xs = (q_RxbqxD, rows, lse, do_RxbqxD.astype(q_RxbqxD.dtype))
    if cfg.num_chunks == 1:
        (dk_M, dv_M), dq = step((zeros, zeros), xs)
    else:
        (dk_M, dv_M), dq = jax.lax.scan(step, (zeros, zeros),
                                        jax.tree.map(lambda x: _chunked(x, cfg.num_chunks), xs))
        dq = _unchunked(dq)
    return (dq.astype(q_RxbqxD.dtype), dk_M.astype(k_M.dtype), dv_M.astype(v_M.dtype), None, None)


_attend.defvjp(_attend_fwd, _attend_bwd)


def _row_lists(block_indices, num_kv_heads: int, num_kv_blocks: int):
    """-> (idx, used, flat) [R, n_sel]: the listed block, whether the slot counts (>= 0 and not a
    repeat of an earlier slot) and the row in the flat [B Hkv nk] block table."""
    B, H, nq, N = block_indices.shape
    idx_RxN = block_indices.reshape(B * H * nq, N)
    earlier_NxN = jnp.arange(N)[None, :] < jnp.arange(N)[:, None]  # [s, s']: s' < s
    repeat_RxN = jnp.any((idx_RxN[:, :, None] == idx_RxN[:, None, :]) & earlier_NxN, axis=-1)
    used_RxN = (idx_RxN >= 0) & ~repeat_RxN
    kv_head_BxHxnq = (jnp.arange(B)[:, None, None] * num_kv_heads
                      + jnp.arange(H)[None, :, None] // (H // num_kv_heads)) * num_kv_blocks
    base_R = jnp.broadcast_to(kv_head_BxHxnq, (B, H, nq)).reshape(-1)
    flat_RxN = base_R[:, None] + jnp.clip(idx_RxN, 0, num_kv_blocks - 1)
    return idx_RxN, used_RxN, flat_RxN


# One compiled program per shape also in eager calls (the layers' tests call the op eagerly).
@functools.partial(jax.jit, static_argnames=("block_size", "causal", "scale"))
def block_sparse_attention(q, k, v, block_indices, *, block_size, causal, scale, segment_ids, query_blocks=None,
                           kv_segment_ids=None):
    B, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    bq, bk = block_size
    nq, nk, N = -(-T // bq), -(-S // bk), block_indices.shape[-1]
    R = B * H * nq
    if R == 0 or N == 0 or S == 0:
        return jnp.zeros_like(q)
    rows_per_chunk = max(1, SCORE_BUDGET // (bq * N * bk))
    num_chunks = -(-R // rows_per_chunk)
    rows_per_chunk = -(-R // num_chunks)
    R_padded = num_chunks * rows_per_chunk
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)

    # q [B, T, H, D] -> rows [B H nq, bq, D]; k, v [B, S, Hkv, D] -> blocks [B Hkv nk, bk, D].
    q_RxbqxD = jnp.pad(q.astype(dtype), ((0, 0), (0, nq * bq - T), (0, 0), (0, 0)))
    q_RxbqxD = q_RxbqxD.reshape(B, nq, bq, H, D).transpose(0, 3, 1, 2, 4).reshape(R, bq, D)
    to_blocks = lambda x: jnp.pad(x.astype(dtype), ((0, 0), (0, nk * bk - S), (0, 0), (0, 0))).reshape(
        B, nk, bk, Hkv, D).transpose(0, 3, 1, 2, 4).reshape(B * Hkv * nk, bk, D)
    k_M, v_M = to_blocks(k), to_blocks(v)

    idx_RxN, used_RxN, flat_RxN = _row_lists(block_indices, Hkv, nk)
    qblock_nq = jnp.arange(nq) if query_blocks is None else query_blocks.astype(jnp.int32)
    qblock_R = jnp.broadcast_to(qblock_nq, (B, H, nq)).reshape(R)
    if segment_ids is not None:  # kv_segment_ids [B, S], or T == S (checked by the api)
        kv_segment_ids = segment_ids if kv_segment_ids is None else kv_segment_ids
        seg_BxTp = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, nq * bq - T)), constant_values=-1)
        segq_Rxbq = jnp.broadcast_to(seg_BxTp.reshape(B, 1, nq, bq), (B, H, nq, bq)).reshape(R, bq)
        seg_BxSp = jnp.pad(kv_segment_ids.astype(jnp.int32), ((0, 0), (0, nk * bk - S)), constant_values=-2)
        # The flat block table is [B, Hkv, nk]: segment blocks repeated per kv head (small ints).
        segk_M = jnp.broadcast_to(seg_BxSp.reshape(B, 1, nk, bk), (B, Hkv, nk, bk)).reshape(-1, bk)
    else:
        segq_Rxbq = jnp.zeros((R, 1), jnp.int32)
        segk_M = jnp.zeros((1, 1), jnp.int32)
    rows = (qblock_R, idx_RxN, used_RxN, flat_RxN, segq_Rxbq)
    if R_padded > R:  # padding rows list nothing (unused slots), so they give zeros
        pad = lambda x: jnp.pad(x, ((0, R_padded - R),) + ((0, 0),) * (x.ndim - 1))
        q_RxbqxD, rows = pad(q_RxbqxD), jax.tree.map(pad, rows)

    cfg = _Config(bq, bk, causal, scale, S, nk * bk != S, segment_ids is not None, num_chunks)
    o_RxbqxD = _attend(cfg, q_RxbqxD, k_M, v_M, segk_M, rows)[:R]
    o_BxTxHxD = o_RxbqxD.reshape(B, H, nq, bq, D).transpose(0, 2, 3, 1, 4).reshape(B, nq * bq, H, D)[:, :T]
    return o_BxTxHxD.astype(q.dtype)
