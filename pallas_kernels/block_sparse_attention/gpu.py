"""Block-sparse softmax attention as Pallas GPU kernels (Triton backend), forward and backward.

FlashAttention-2 (Dao 2023) restricted to listed key blocks, as in MoBA / NSA-style selection:
query block n = rows [n Bq, (n + 1) Bq) visits only the key blocks m in its list L[b, h, n]:

    s = scale * q_n k_m^T  (masked: causal i >= j, same segment, inside T and S),   [Bq, Bk]
    m_new = max(m, rowmax s),  l = exp(m - m_new) l + rowsum exp(s - m_new)
    acc = exp(m - m_new) acc + exp(s - m_new) v_m,     o_n = acc / l,  lse_n = m + log l

Backward (gpu_backward.py): with p = exp(s - lse), delta = rowsum(do * o),
ds = p * (do v^T - delta): dq_n = scale * sum_m ds k_m over the list of n, and
dk_m = scale * sum_n ds^T q_n, dv_m = sum_n p^T do_n over the inverse list of m (the query blocks
that list m), summed over the query heads of a key/value head (GQA) inside the kernel.

Layout: the wrapper cuts q [B, T, H, D] into blocks [B, H, Nq, Bq', D'] (k, v: [B, Hkv, Nk, Bk',
D']) where Bq', Bk', D' are the block sizes and head dim rounded up to powers of two >= 16 (Triton
`dot` shapes) and zero padded; the padded rows are masked by position, padded channels are exact
zeros. A kernel then loads a whole block by integer indices, so any block_size works. The lists
are preprocessed with jnp: slots that are -1, repeated, or (causal) wholly in the future of the
query block are dropped, the rest sorted ascending and packed to the front with a count per row,
so a kernel loops `fori_loop(0, count)` over useful blocks only. Rows that see no key output zeros
and store lse = +inf (so exp(s - lse) = 0 in the backward, never NaN). Softmax statistics are
float32; bfloat16 (float16) inputs give 16-bit dot operands (p and ds rounded too) with float32
accumulation, float32 inputs float32 operands at IEEE precision (not TF32).

Backend: Pallas' Triton lowering, written with generic Pallas ops only (block loads by index,
jnp arithmetic, `jnp.dot`, `lax.fori_loop`), so the kernels would port to Mosaic GPU, jax's
future GPU path (the Pallas Triton backend is deprecated from jax 0.11 and warns so). Grids:
forward and dq (B H, Nq), dk/dv (B Hkv, Nk). Off GPU the kernels run in interpret mode.

Status: matches the dense float32 reference in interpret mode and lowers to Triton IR for an H100,
but has not run on a GPU (experiments/bench/sparse_attention_gpu.py times it there).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from hybrax.pallas_kernels.implementation import interpret_mode

F32 = jnp.float32


def _pow2_at_least_16(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class Config:
    batch: int
    heads: int
    kv_heads: int
    q_len: int             # T
    kv_len: int            # S
    block_q: int           # the op's block sizes
    block_k: int
    padded_block_q: int    # powers of two >= 16, the kernels' block shapes
    padded_block_k: int
    head_dim: int          # padded
    causal: bool
    scale: float
    has_segments: bool
    interpret: bool
    mxu_dtype: str = "float32"  # "bfloat16" / "float16" when q, k, v all are: 16-bit dot operands

    @property
    def groups(self) -> int:
        return self.heads // self.kv_heads

    @property
    def num_q_blocks(self) -> int:
        return -(-self.q_len // self.block_q)

    @property
    def num_kv_blocks(self) -> int:
        return -(-self.kv_len // self.block_k)

    def dot(self, x, y):
        """x @ y accumulated in float32: 16-bit operands (tensor cores), or float32 ones at full
        IEEE precision (Triton's default for float32 would be TF32, ~1e-3 relative error)."""
        if self.mxu_dtype != "float32":
            return jnp.dot(self.operand(x), self.operand(y), preferred_element_type=F32)
        return jnp.dot(x.astype(F32), y.astype(F32), precision=lax.Precision.HIGHEST,
                       preferred_element_type=F32)

    def operand(self, x):
        """x rounded to the dot operand dtype (p and ds before their second dot)."""
        return x.astype(jnp.dtype(self.mxu_dtype))


def compiler_params(config: Config):
    big = config.padded_block_q * config.padded_block_k * config.head_dim > 64 * 64 * 64
    return pltriton.CompilerParams(num_warps=8 if big else 4, num_stages=2)


def visible(config: Config, refs: dict, b, n, m):
    """[Bq', Bk'] bool: query row i of block n may see key j of block m (inside T and S, causal,
    same segment). The list membership is the caller's loop."""
    bq, bk = config.padded_block_q, config.padded_block_k
    row = lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    col = lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    q_pos, k_pos = n * config.block_q + row, m * config.block_k + col
    keep = jnp.logical_and(q_pos < config.q_len, k_pos < config.kv_len)
    if config.block_q < bq:
        keep = jnp.logical_and(keep, row < config.block_q)
    if config.block_k < bk:
        keep = jnp.logical_and(keep, col < config.block_k)
    if config.causal:
        keep = jnp.logical_and(keep, q_pos >= k_pos)
    if config.has_segments:
        keep = jnp.logical_and(keep, refs["q_segment"][b, n] == refs["k_segment"][b, m])  # [Bq',1]==[1,Bk']
    return keep


def masked_scores(config: Config, refs: dict, q, k, b, n, m):
    """scale * q k^T in float32 with invisible pairs at -inf."""
    s = config.dot(q, k.T) * config.scale
    return jnp.where(visible(config, refs, b, n, m), s, -jnp.inf)


def _forward_kernel(config: Config, names, *refs):
    refs = dict(zip(names, refs))
    bq, d = config.padded_block_q, config.head_dim
    bh, n = pl.program_id(0), pl.program_id(1)  # read outside loops (interpret mode)
    b, h = bh // config.heads, bh % config.heads
    h_kv = h // config.groups
    q = refs["q"][b, h, n]  # [Bq', D']

    def visit(slot, carry):
        m_run, l_run, acc = carry
        m = refs["lists"][b, h, n, slot]
        v = refs["v"][b, h_kv, m]
        s = masked_scores(config, refs, q, refs["k"][b, h_kv, m], b, n, m)
        m_new = jnp.maximum(m_run, jnp.max(s, axis=1, keepdims=True))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows seeing nothing yet: exp(-inf) = 0
        p = jnp.exp(s - m_safe)
        alpha = jnp.exp(m_run - m_safe)
        return (m_new, alpha * l_run + jnp.sum(p, axis=1, keepdims=True),
                alpha * acc + config.dot(config.operand(p), v))

    init = (jnp.full((bq, 1), -jnp.inf, F32), jnp.zeros((bq, 1), F32), jnp.zeros((bq, d), F32))
    m_run, l_run, acc = lax.fori_loop(0, refs["counts"][b, h, n], visit, init)
    seen = l_run > 0.0
    l_safe = jnp.where(seen, l_run, 1.0)
    refs["o"][b, h, n] = jnp.where(seen, acc / l_safe, 0.0).astype(refs["o"].dtype)
    refs["lse"][b, h, n] = jnp.where(seen, m_run + jnp.log(l_safe), jnp.inf)


def kernel_inputs(refs_by_name: dict):
    """(names, arrays) of the present inputs, in a fixed order."""
    order = ["q", "k", "v", "lists", "counts", "q_segment", "k_segment", "o", "lse", "do", "delta",
             "inverse", "inverse_counts"]
    names = [n for n in order if refs_by_name.get(n) is not None]
    return names, [refs_by_name[n] for n in names]


def forward(config: Config, q, k, v, lists, counts, segments):
    """Kernel-level forward on block layout -> (o [B, H, Nq, Bq', D'], lse [B, H, Nq, Bq', 1])."""
    names, args = kernel_inputs(dict(q=q, k=k, v=v, lists=lists, counts=counts,
                                     q_segment=segments[0] if segments else None,
                                     k_segment=segments[1] if segments else None))
    B, H, nq = config.batch, config.heads, config.num_q_blocks
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((B, H, nq, config.padded_block_q, 1), F32)]
    return pl.pallas_call(
        functools.partial(_forward_kernel, config, names + ["o", "lse"]),
        grid=(B * H, nq),
        out_shape=out_shape,
        compiler_params=compiler_params(config),
        interpret=config.interpret,
        name="block_sparse_attention_fwd",
    )(*args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(config, q, k, v, lists, counts, segments):
    return forward(config, q, k, v, lists, counts, segments)[0]


def _attention_fwd(config, q, k, v, lists, counts, segments):
    o, lse = forward(config, q, k, v, lists, counts, segments)
    return o, (q, k, v, lists, counts, segments, o, lse)


def _attention_bwd(config, residuals, do):
    from hybrax.pallas_kernels.block_sparse_attention.gpu_backward import backward  # imports this module
    q, k, v, lists, counts, segments, o, lse = residuals
    dq, dk, dv = backward(config, q, k, v, lists, counts, segments, o, lse, do)
    return dq, dk, dv, None, None, tuple(None for _ in segments)


_attention.defvjp(_attention_fwd, _attention_bwd)


def prepare_lists(block_indices, config: Config):
    """int32 [B, H, Nq, n_sel] -> (lists, counts [B, H, Nq]): per query block the distinct useful
    key blocks ascending at the front of the row, -1 after them."""
    n_sel = block_indices.shape[-1]
    big = jnp.int32(jnp.iinfo(jnp.int32).max)
    useful = block_indices >= 0
    if config.causal:  # drop key blocks that start after the query block's last row
        n = jnp.arange(config.num_q_blocks, dtype=jnp.int32)[:, None]
        last_row = jnp.minimum(n * config.block_q + config.block_q, config.q_len) - 1
        useful &= block_indices * config.block_k <= last_row
    ordered = jnp.sort(jnp.where(useful, block_indices, big), axis=-1)
    if n_sel > 1:
        repeat = ordered[..., 1:] == ordered[..., :-1]
        ordered = jnp.sort(ordered.at[..., 1:].set(jnp.where(repeat, big, ordered[..., 1:])), axis=-1)
    kept = ordered != big
    return jnp.where(kept, ordered, -1), jnp.sum(kept, axis=-1, dtype=jnp.int32)


def to_blocks(x_BxTxHxD, block: int, padded_block: int, head_dim: int):
    """[B, T, H, D] -> [B, H, N, Bp, Dp], zero padded (T to N * block, rows to Bp, D to Dp)."""
    B, T, H, D = x_BxTxHxD.shape
    num_blocks = -(-T // block)
    x = jnp.pad(jnp.transpose(x_BxTxHxD, (0, 2, 1, 3)), ((0, 0), (0, 0), (0, num_blocks * block - T),
                                                           (0, head_dim - D)))
    x = x.reshape(B, H, num_blocks, block, head_dim)
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, padded_block - block), (0, 0)))


def from_blocks(x_BxHxNxBpxDp, block: int, seq_len: int, dim: int):
    """Inverse of to_blocks: [B, H, N, Bp, Dp] -> [B, T, H, D]."""
    B, H, N = x_BxHxNxBpxDp.shape[:3]
    x = x_BxHxNxBpxDp[:, :, :, :block, :dim].reshape(B, H, N * block, dim)[:, :, :seq_len]
    return jnp.transpose(x, (0, 2, 1, 3))


def segment_blocks(segment_ids_BxT, config: Config):
    """-> (query ids [B, Nq, Bq', 1], key ids [B, Nk, 1, Bk']) int32; padding is masked by position."""
    seg = segment_ids_BxT.astype(jnp.int32)[:, :, None, None]
    q_seg = to_blocks(seg, config.block_q, config.padded_block_q, 1)[:, 0]
    k_seg = to_blocks(seg, config.block_k, config.padded_block_k, 1)[:, 0]
    return q_seg, jnp.swapaxes(k_seg, -1, -2)


def block_sparse_attention_kernel(q, k, v, block_indices, *, block_size, causal: bool, scale: float,
                                  segment_ids, interpret=None):
    """The contract's signature plus `interpret` (None: compiled on a GPU, interpreted on a CPU, refused on a TPU)."""
    if interpret is None:
        interpret = interpret_mode("pallas_gpu block_sparse_attention", "gpu")
    B, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    block_q, block_k = block_size
    low_precision = q.dtype in (jnp.bfloat16, jnp.float16) and q.dtype == k.dtype == v.dtype
    config = Config(B, H, Hkv, T, S, block_q, block_k, _pow2_at_least_16(block_q),
                    _pow2_at_least_16(block_k), _pow2_at_least_16(D), bool(causal), float(scale),
                    segment_ids is not None, interpret, q.dtype.name if low_precision else "float32")
    dtype, out_dtype = jnp.result_type(q, k, v), q.dtype
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    segments = () if segment_ids is None else segment_blocks(segment_ids, config)
    lists, counts = prepare_lists(block_indices.astype(jnp.int32), config)
    o = _attention(config, to_blocks(q, block_q, config.padded_block_q, config.head_dim),
                   to_blocks(k, block_k, config.padded_block_k, config.head_dim),
                   to_blocks(v, block_k, config.padded_block_k, config.head_dim), lists, counts, segments)
    return from_blocks(o, block_q, T, D).astype(out_dtype)


def block_sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, block_indices: jax.Array, *,
                           block_size: tuple[int, int], causal: bool, scale: float,
                           segment_ids: jax.Array | None) -> jax.Array:
    """Pallas GPU block-sparse attention: o [B, T, H, D] in q's dtype (see the module docstring)."""
    return block_sparse_attention_kernel(q, k, v, block_indices, block_size=block_size, causal=causal,
                                         scale=scale, segment_ids=segment_ids)
