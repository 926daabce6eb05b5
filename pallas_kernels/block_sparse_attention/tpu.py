"""Block-sparse softmax attention as Pallas Mosaic TPU kernels, forward and backward (custom_vjp).

Flash attention (Dao et al. 2022; FlashAttention-2, Dao 2023) restricted to listed key blocks, as
fed by MoBA (Lu et al. 2025), NSA's selected branch (Yuan et al. 2025) and bi-level routing
attention (BiFormer, Zhu et al. 2023). For query block n (rows [n bq, (n+1) bq)) and its listed key
blocks L_n (each [m bk, (m+1) bk)), with M the mask (listed, causal, same segment, inside T and S):

    s_tj = scale * q_t . k_j,   lse_t = log sum_{j in M_t} exp(s_tj),   o_t = sum_j exp(s_tj - lse_t) v_j

Forward grid (B, H, num_q_blocks, n_sel): slot j of query block n's list is the kernel step; the
list (deduplicated, future blocks dropped when causal) is scalar-prefetched into SMEM and drives
the K / V index maps, so only listed blocks are DMA'd. Online softmax: running max m, sum l and
accumulator acc [bq, D] in float32 VMEM scratch; an empty slot is skipped with `pl.when` and its
index map repeats the previous block (no new DMA). The forward also writes lse for the backward
(tpu_backward.py: dq on this grid, dk/dv over the listed pairs grouped by key block).

Layout: q, o [B, H, Tq, D] and k, v [B, Hkv, Sk, D] (Tq, Sk padded to the blocks), blocks
(bq, D) and (bk, D); query-side vectors are columns ([.., Tq, 1]: lse, delta, query segment ids),
key-side vectors rows ([B, nk, 1, bk]: key segment ids), so masks broadcast without transposes.
On a real TPU bq and bk must be multiples of 8 (16 for bfloat16) unless they cover the whole
(padded) sequence. GQA: query head h reads key/value head h // (H // Hkv).

Precision: scores, softmax statistics and accumulators are float32. With bfloat16 q, k, v the MXU
takes bfloat16 operands (q k^T, and p v with p rounded to bfloat16, as in flash attention).

SMEM holds B * H * num_q_blocks * n_sel int32 (forward, dq; three times that for dk/dv): fine for
thousands of blocks, not for millions.
Off TPU the kernels run in Pallas interpret mode (`INTERPRET`).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from hybrax.pallas_kernels.implementation import interpret_mode

F32 = jnp.float32
NT = (((1,), (1,)), ((), ()))  # x @ y^T
TN = (((0,), (0,)), ((), ()))  # x^T @ y
NN = (((1,), (0,)), ((), ()))
MASKED = -1e30  # finite: a row that has seen nothing keeps exp(m_prev - m_new) = 1, never NaN

# None: interpret mode when the default backend is not a TPU; True / False / pltpu.InterpretParams()
# force it (tests monkeypatch this switch).
INTERPRET: object = None


@dataclasses.dataclass(frozen=True)
class Config:
    batch: int
    heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    block_q: int
    block_k: int
    n_sel: int
    causal: bool
    scale: float
    has_segments: bool
    interpret: object
    mxu_dtype: str  # "bfloat16" when q, k, v are

    @property
    def num_q_blocks(self) -> int:
        return -(-self.q_len // self.block_q)

    @property
    def num_kv_blocks(self) -> int:
        return -(-self.kv_len // self.block_k)

    @property
    def groups(self) -> int:
        return self.heads // self.kv_heads


def dot(config: Config, x, y, dims=NN):
    """Matmul with float32 accumulation; operands in the MXU dtype (bfloat16: one pass)."""
    operand = jnp.dtype(config.mxu_dtype)
    return lax.dot_general(x.astype(operand), y.astype(operand), dims, preferred_element_type=F32)


def compiler_params(grid_rank: int = 4):
    """Every grid axis parallel but the last (the one that accumulates)."""
    return pltpu.CompilerParams(dimension_semantics=("parallel",) * (grid_rank - 1) + ("arbitrary",))


def fetched_block(code):
    """Slot code -> block to DMA: a listed block is >= 0; an empty slot stores -1 - (block to repeat)."""
    return jnp.where(code >= 0, code, -1 - code)


def encode_slots(sorted_blocks, empty: int):
    """Sorted lists (`empty` marks unused slots, sorted last) -> slot codes for the kernels.

    A used slot keeps its block; an unused one stores -1 - b where b is the last used block before
    it (0 if none), so its index map repeats b and the pipeline issues no DMA."""
    used = sorted_blocks != empty
    last_used = lax.cummax(jnp.where(used, sorted_blocks, -1), axis=sorted_blocks.ndim - 1)
    return jnp.where(used, sorted_blocks, -1 - jnp.maximum(last_used, 0)).astype(jnp.int32)


def forward_lists(block_indices, config: Config):
    """[B, H, nq, n_sel] lists -> same-shape slot codes: duplicates and (causal) blocks entirely in
    the future dropped, used blocks ascending first."""
    nq, nk = config.num_q_blocks, config.num_kv_blocks
    blocks = block_indices
    if config.causal:  # key block m is all future for query block n when m bk > (n + 1) bq - 1
        last_query = (jnp.arange(nq, dtype=jnp.int32) + 1) * config.block_q - 1
        blocks = jnp.where(blocks * config.block_k > last_query[:, None], -1, blocks)
    blocks = jnp.sort(jnp.where(blocks < 0, nk, blocks), axis=-1)
    repeat = jnp.concatenate([jnp.zeros_like(blocks[..., :1], bool), blocks[..., 1:] == blocks[..., :-1]], -1)
    return encode_slots(jnp.where(repeat, nk, blocks), nk)


def key_major_pairs(codes, config: Config):
    """The listed (query block, key block) pairs of each key/value head, grouped by key block: the
    dk/dv kernel's schedule. -> (key_block, query, flags), int32 [B, Hkv, W], W = G nq min(n_sel, nk).

    Pair t of kv head kh: key block key_block[t], query = g * nq + n (query head kh G + g, query
    block n); pairs sorted by (key block, query), unused ones last. flags: 1 used, 2 first pair of
    its key block (zero the accumulators), 4 last pair (write dk, dv). Unused pairs repeat the last
    used key block and query, so they trigger no DMA and no write-back. Key blocks nobody lists get
    no pair: their dk, dv are zeroed by the caller (`visited_key_blocks`)."""
    B, Hkv, G, nq, nk = config.batch, config.kv_heads, config.groups, config.num_q_blocks, config.num_kv_blocks
    n_sel = codes.shape[-1]
    query = jnp.arange(G * nq, dtype=jnp.int32).reshape(G, nq, 1)
    key_BxKxGxNxJ = jnp.where(codes >= 0, codes, nk).reshape(B, Hkv, G, nq, n_sel)
    order_key = (key_BxKxGxNxJ * (G * nq) + query).reshape(B, Hkv, G * nq * n_sel)
    order_key = jnp.sort(order_key, axis=-1)[..., :G * nq * min(n_sel, nk)]  # at most nk used per list
    key, query = order_key // (G * nq), order_key % (G * nq)
    used = key < nk
    first = used & jnp.concatenate([jnp.ones_like(used[..., :1]), key[..., 1:] != key[..., :-1]], -1)
    last = used & jnp.concatenate([key[..., 1:] != key[..., :-1], jnp.ones_like(used[..., :1])], -1)
    count = jnp.sum(used, axis=-1, keepdims=True)  # used pairs come first: repeat pair count - 1
    last_used = lambda x: jnp.where(count > 0, jnp.take_along_axis(x, jnp.maximum(count - 1, 0), axis=-1), 0)
    repeat = lambda x: jnp.where(used, x, last_used(x))
    flags = used.astype(jnp.int32) + 2 * first.astype(jnp.int32) + 4 * last.astype(jnp.int32)
    return repeat(key).astype(jnp.int32), repeat(query).astype(jnp.int32), flags


def visited_key_blocks(codes, config: Config):
    """bool [B, Hkv, nk]: some query block of the group lists key block m."""
    B, H, nq, n_sel = codes.shape
    target = jnp.where(codes >= 0, codes, config.num_kv_blocks).reshape(B, config.kv_heads, -1)
    b, kh, _ = jnp.meshgrid(*(jnp.arange(s) for s in target.shape), indexing="ij")
    visited = jnp.zeros((B, config.kv_heads, config.num_kv_blocks), bool)
    return visited.at[b, kh, target].set(True, mode="drop")


def segment_inputs(segment_ids, config: Config):
    """(query ids [B, Tq, 1] as columns, key ids [B, nk, 1, bk] as rows) int32, padded with -1
    (padded positions are masked by position anyway), or () without segments."""
    if segment_ids is None:
        return ()
    seg = segment_ids.astype(jnp.int32)
    q_pad = config.num_q_blocks * config.block_q - config.q_len
    k_pad = config.num_kv_blocks * config.block_k - config.kv_len
    q_seg = jnp.pad(seg, ((0, 0), (0, q_pad)), constant_values=-1)[:, :, None]
    k_seg = jnp.pad(seg, ((0, 0), (0, k_pad)), constant_values=-1)
    return q_seg, k_seg.reshape(config.batch, config.num_kv_blocks, 1, config.block_k)


def visible(config: Config, q_block, k_block, segment_refs):
    """[bq, bk] bool: causal (absolute positions), inside T and S, same segment. Listing is the
    caller's (`pl.when` on the slot)."""
    shape = (config.block_q, config.block_k)
    q_pos = q_block * config.block_q + lax.broadcasted_iota(jnp.int32, shape, 0)
    k_pos = k_block * config.block_k + lax.broadcasted_iota(jnp.int32, shape, 1)
    keep = k_pos < config.kv_len
    if config.q_len % config.block_q:
        keep = jnp.logical_and(keep, q_pos < config.q_len)
    if config.causal:
        keep = jnp.logical_and(keep, q_pos >= k_pos)
    if segment_refs:
        q_seg_ref, k_seg_ref = segment_refs
        keep = jnp.logical_and(keep, q_seg_ref[...] == k_seg_ref[...])
    return keep


def row_specs(config: Config, q_index, k_index):
    """BlockSpecs of q-side columns [.., Tq, 1] / key-side segment rows given index functions of
    the grid and the prefetched codes -> (b, query head, query block) / (b, key block)."""
    bq, bk = config.block_q, config.block_k

    def q_map(*args):
        b, h, n = q_index(*args)
        return b, h, n, 0

    def q_seg_map(*args):
        b, _, n = q_index(*args)
        return b, n, 0

    def k_seg_map(*args):
        b, m = k_index(*args)
        return b, m, 0, 0

    return dict(head_column=pl.BlockSpec((None, None, bq, 1), q_map),
                q_seg=pl.BlockSpec((None, bq, 1), q_seg_map),
                k_seg=pl.BlockSpec((None, None, 1, bk), k_seg_map))


def forward_slot(config: Config):
    """Grid (b, h, n, j) + codes ref -> (flat index of the slot's code)."""
    H, nq, n_sel = config.heads, config.num_q_blocks, config.n_sel
    return lambda b, h, n, j: ((b * H + h) * nq + n) * n_sel + j


def forward_specs(config: Config):
    """In specs (q, k, v, segments) and the q-side specs, on the forward / dq grid."""
    bq, bk, D, G = config.block_q, config.block_k, config.head_dim, config.groups
    slot = forward_slot(config)
    q_spec = pl.BlockSpec((None, None, bq, D), lambda b, h, n, j, codes: (b, h, n, 0))
    kv_spec = pl.BlockSpec((None, None, bk, D),
                           lambda b, h, n, j, codes: (b, lax.div(h, G), fetched_block(codes[slot(b, h, n, j)]), 0))
    rows = row_specs(config, lambda b, h, n, j, codes: (b, h, n),
                     lambda b, h, n, j, codes: (b, fetched_block(codes[slot(b, h, n, j)])))
    segments = [rows["q_seg"], rows["k_seg"]] if config.has_segments else []
    return q_spec, kv_spec, rows["head_column"], segments


def _forward_kernel(config: Config, codes_ref, q_ref, k_ref, v_ref, *refs):
    segment_refs = refs[:2] if config.has_segments else ()
    o_ref, lse_ref, m_ref, l_ref, acc_ref = refs[len(segment_refs):]
    b, h, n, j = (pl.program_id(axis) for axis in range(4))
    code = codes_ref[forward_slot(config)(b, h, n, j)]

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, MASKED, F32)
        l_ref[...] = jnp.zeros(l_ref.shape, F32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, F32)

    @pl.when(code >= 0)
    def _accumulate():
        keep_QxK = visible(config, n, code, segment_refs)
        s_QxK = jnp.where(keep_QxK, config.scale * dot(config, q_ref[...], k_ref[...], NT), MASKED)
        m_prev_Qx1 = m_ref[...]
        m_new_Qx1 = jnp.maximum(m_prev_Qx1, jnp.max(s_QxK, axis=1, keepdims=True))
        p_QxK = jnp.where(keep_QxK, jnp.exp(s_QxK - m_new_Qx1), 0.0)
        alpha_Qx1 = jnp.exp(m_prev_Qx1 - m_new_Qx1)
        l_ref[...] = alpha_Qx1 * l_ref[...] + jnp.sum(p_QxK, axis=1, keepdims=True)
        acc_ref[...] = alpha_Qx1 * acc_ref[...] + dot(config, p_QxK, v_ref[...])
        m_ref[...] = m_new_Qx1

    @pl.when(j == config.n_sel - 1)
    def _finish():
        l_Qx1 = l_ref[...]
        seen_Qx1 = l_Qx1 > 0.0  # a visible key contributes exp(0) = 1 at the row max
        safe_l_Qx1 = jnp.where(seen_Qx1, l_Qx1, 1.0)
        o_ref[...] = jnp.where(seen_Qx1, acc_ref[...] / safe_l_Qx1, 0.0).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(seen_Qx1, m_ref[...] + jnp.log(safe_l_Qx1), 0.0)


def forward(config: Config, q, k, v, codes, segments):
    """Kernel-level forward on [B, H, Tq, D] / [B, Hkv, Sk, D] -> (o [B, H, Tq, D], lse [B, H, Tq, 1])."""
    B, H, nq, bq, D = config.batch, config.heads, config.num_q_blocks, config.block_q, config.head_dim
    q_spec, kv_spec, column_spec, segment_specs = forward_specs(config)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(B, H, nq, config.n_sel),
        in_specs=[q_spec, kv_spec, kv_spec, *segment_specs],
        out_specs=[q_spec, column_spec],
        scratch_shapes=[pltpu.VMEM((bq, 1), F32), pltpu.VMEM((bq, 1), F32), pltpu.VMEM((bq, D), F32)],
    )
    return pl.pallas_call(
        functools.partial(_forward_kernel, config),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, H, nq * bq, 1), F32)],
        compiler_params=compiler_params(),
        interpret=config.interpret,
        name="block_sparse_attention_fwd",
    )(codes.reshape(-1), q, k, v, *segments)


def _backward():
    from hybrax.pallas_kernels.block_sparse_attention.tpu_backward import backward
    return backward


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(config: Config, q, k, v, codes, segments):
    return forward(config, q, k, v, codes, segments)[0]


def _attention_fwd(config: Config, q, k, v, codes, segments):
    o, lse = forward(config, q, k, v, codes, segments)
    return o, (q, k, v, codes, segments, o, lse)


def _attention_bwd(config: Config, residuals, do):
    dq, dk, dv = _backward()(config, *residuals, do)
    return dq, dk, dv, None, tuple(None for _ in residuals[4])


_attention.defvjp(_attention_fwd, _attention_bwd)


def _to_heads(x_BxTxHxD, padded_len: int):
    x = jnp.transpose(x_BxTxHxD, (0, 2, 1, 3))
    return jnp.pad(x, ((0, 0), (0, 0), (0, padded_len - x.shape[2]), (0, 0)))


def block_sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, block_indices: jax.Array, *,
                           block_size: tuple[int, int], causal: bool, scale: float,
                           segment_ids: jax.Array | None, interpret=None) -> jax.Array:
    """Pallas TPU block-sparse attention: o [B, T, H, D] in q's dtype (contract: api.py).
    `interpret` None falls back to the module's INTERPRET switch, then to "not on a TPU"."""
    dtype = jnp.promote_types(q.dtype, jnp.promote_types(k.dtype, v.dtype))
    if dtype not in (jnp.float32, jnp.bfloat16):
        raise NotImplementedError(f"pallas_tpu block_sparse_attention takes float32 or bfloat16; got {dtype}")
    if interpret is None:
        interpret = INTERPRET if INTERPRET is not None else interpret_mode("pallas_tpu block_sparse_attention", "tpu")
    sublanes = 16 if dtype == jnp.bfloat16 else 8   # Mosaic tiles: a block's rows come in multiples of these
    if not interpret and any(b % sublanes for b in block_size):
        raise NotImplementedError(f"pallas_tpu needs block_size={tuple(block_size)} in multiples of {sublanes} "
                                  f"for {jnp.dtype(dtype).name} on a TPU")
    # One jit around the list preparation, layout glue and kernels: eager callers compile one
    # program instead of dispatching each small jnp op.
    return _jitted(q, k, v, block_indices, segment_ids, tuple(block_size), bool(causal), float(scale),
                   interpret, dtype)


@functools.partial(jax.jit, static_argnums=(5, 6, 7, 8, 9))
def _jitted(q, k, v, block_indices, segment_ids, block_size, causal, scale, interpret, dtype):
    B, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    config = Config(B, H, Hkv, T, S, D, *block_size, block_indices.shape[-1], causal, scale,
                    segment_ids is not None, interpret, "bfloat16" if dtype == jnp.bfloat16 else "float32")
    codes = forward_lists(block_indices.astype(jnp.int32), config)
    o = _attention(config, _to_heads(q.astype(dtype), config.num_q_blocks * config.block_q),
                   _to_heads(k.astype(dtype), config.num_kv_blocks * config.block_k),
                   _to_heads(v.astype(dtype), config.num_kv_blocks * config.block_k),
                   codes, segment_inputs(segment_ids, config))
    return jnp.transpose(o[:, :, :T], (0, 2, 1, 3)).astype(q.dtype)
