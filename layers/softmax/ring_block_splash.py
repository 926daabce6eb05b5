"""Ring attention's per-step block on TPU: jax's fused splash attention kernels, with the
log-sum-exp.

One ring step attends the local queries to one travelling key/value block (`ring_attention`'s
three zigzag cases, each a static mask on a sub-square of the 2c x 2c block):

    own block (src == d):  q [2c] x k [2c], causal (the stored rows are in increasing natural
                           position, so the zigzag mask of the pair (d, 2P-1-d) is the lower triangle)
    src < d:               q [2c] x k[:c], full
    src > d:               q[c:] x k [2c], full

each AND same segment (`SegmentIds(q=..., kv=...)`: query and key ids differ, they come from
different devices). The fused kernels never hold the [2c, 2c] scores:

- forward: splash's kernel with `save_residuals=True` gives the block's
      o_blk = softmax_blk(s) v,  lse_blk = logsumexp_blk(s)       (per query row and head)
  which the ring merges as the online softmax does (o = sum exp(lse_blk - lse) o_blk). No AD runs
  through it: the ring has its own custom_vjp. A row that sees no key of the block gets a finite
  lse_blk near splash's mask value (-0.7 * float32 max), so its weight in the merge is exactly 0
  (the own block, always first, gives every row a finite lse).
- backward: splash's own dk/dv and dq kernels (`_splash_attention_bwd_dkv`, `_splash_attention_bwd_dq`,
  private to jax 0.10.2's splash_attention_kernel.py) take the residual `logsumexp` and
  di = rowsum(do * o) as inputs and recompute p = exp(s - logsumexp), ds = p * (do v^T - di).
  Given the GLOBAL lse and the GLOBAL o's di they return exactly the block's share of dq, dk, dv:
      dq_blk = scale ds k,  dk_blk = ds^T (scale q),  dv_blk = p^T do
  (masked scores are the mask value, so p = exp(mask - lse) = 0 there).

Conventions: splash has no softmax scale, so q is multiplied by `scale` first (float32, rounded
once to the compute dtype) and dq_blk by `scale` after; splash's layout is [H, T, D] per batch row,
which is the ring's heads-major layout, vmapped over the local batch; GQA through the MHA
kernel's head map h -> h // (H / Hkv), which also sums dk, dv over each group. Blocks are the
largest of 512, 256, 128 dividing each side. dq_blk, dk_blk, dv_blk come back in the compute
dtype (the kernels' output dtype) before the ring sums them in float32.

Refused with NotImplementedError (the ring falls back to its jnp block): a chunk length c that is
not a multiple of 128 (splash's tiles), and a backend other than TPU except a CPU, where the
kernels run in Pallas' TPU interpret mode.
"""

import functools

import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from hybrax.pallas_kernels.dot_product_attention.splash import LANES, MAX_BLOCK, over_batch
from hybrax.pallas_kernels.implementation import interpret_mode

F32 = jnp.float32


def splash_block(chunk: int):
    """(attend, grads) for chunk length `chunk`, or NotImplementedError (see the module docstring)."""
    interpret = interpret_mode("splash ring_attention_block", "tpu")
    if chunk % LANES:
        raise NotImplementedError(f"splash needs the chunk length T / (2 * seq) = {chunk} to be a multiple of {LANES}")
    return functools.partial(attend, interpret=interpret), functools.partial(grads, interpret=interpret)


def _block(n: int) -> int:
    return next(b for b in (MAX_BLOCK, 256, LANES) if n % b == 0)


@functools.lru_cache(maxsize=32)
def _mask(q_len: int, kv_len: int, heads: int, causal: bool) -> splash_mask.MultiHeadMask:
    """One mask object per shape, so splash's cached block tables are found on every trace."""
    one_head = splash_mask.CausalMask((q_len, kv_len)) if causal else splash_mask.FullMask((q_len, kv_len))
    return splash_mask.MultiHeadMask([one_head] * heads)


def _kernel(q_len: int, kv_len: int, heads: int, causal: bool, interpret) -> splash.SplashAttentionKernel:
    """Splash MHA kernel with residuals, made anew in each trace (its tables are trace constants)."""
    bq, bkv = _block(q_len), _block(kv_len)
    sizes = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                              block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
    return splash.make_splash_mha(_mask(q_len, kv_len, heads, causal), block_sizes=sizes, head_shards=1,
                                  q_seq_shards=1, save_residuals=True, interpret=interpret)


def attend(q_bxHxQxD, k_bxGxKxD, v_bxGxKxD, seg_q_bxQ, seg_k_bxK, *, causal: bool, scale: float, interpret):
    """(o_blk [b, H, Q, D] in the compute dtype, lse_blk [b, H, Q] float32) of one block."""
    _, H, Q, _ = q_bxHxQxD.shape
    dtype = jnp.result_type(q_bxHxQxD, k_bxGxKxD, v_bxGxKxD)
    kernel = _kernel(Q, k_bxGxKxD.shape[2], H, causal, interpret)

    def one_row(q, k, v, seg_q, seg_k):
        o, (lse,) = kernel(q, k, v, segment_ids=splash.SegmentIds(q=seg_q, kv=seg_k))
        return o, lse

    q_scaled = (q_bxHxQxD.astype(F32) * scale).astype(dtype)
    return over_batch(one_row, interpret=interpret)(q_scaled, k_bxGxKxD.astype(dtype), v_bxGxKxD.astype(dtype),
                                                     seg_q_bxQ.astype(jnp.int32), seg_k_bxK.astype(jnp.int32))


def grads(q_bxHxQxD, k_bxGxKxD, v_bxGxKxD, seg_q_bxQ, seg_k_bxK, lse_bxHxQ, do_bxHxQxD, delta_bxHxQ, *,
          causal: bool, scale: float, interpret):
    """The block's share (dq [b, H, Q, D], dk, dv [b, G, K, D]) of the gradients, given the global
    lse [b, H, Q] and delta = rowsum(do * o) [b, H, Q] of the whole ring's output."""
    _, H, Q, _ = q_bxHxQxD.shape
    dtype = jnp.result_type(q_bxHxQxD, k_bxGxKxD, v_bxGxKxD)
    kernel = _kernel(Q, k_bxGxKxD.shape[2], H, causal, interpret)
    sizes, options = kernel.kwargs["block_sizes"], kernel.kwargs
    common = dict(is_mqa=False, mask_value=options["mask_value"], attn_logits_soft_cap=None,
                  q_layout=sizes.q_layout, k_layout=sizes.k_layout, v_layout=sizes.v_layout,
                  mask_function=options["mask_function"], interpret=interpret)

    def one_row(q, k, v, seg_q, seg_k, lse, do, di):
        segment_ids = splash.SegmentIds(q=seg_q, kv=seg_k)
        _, dk, dv = splash._splash_attention_bwd_dkv(
            q, k, v, segment_ids, None, lse, do, di, bq=sizes.block_q_dkv, bkv=sizes.block_kv_dkv,
            bkv_compute=sizes.block_kv_dkv_compute, mask_info=kernel.dkv_mask_info, use_fused_bwd_kernel=False,
            **common)
        dq = splash._splash_attention_bwd_dq(
            q, k, v, segment_ids, None, lse, do, di, bq=sizes.block_q_dq, bkv=sizes.block_kv_dq,
            mask_info=kernel.dq_mask_info, **common)
        return dq, dk, dv

    q_scaled = (q_bxHxQxD.astype(F32) * scale).astype(dtype)
    dq, dk, dv = over_batch(one_row, interpret=interpret)(
        q_scaled, k_bxGxKxD.astype(dtype), v_bxGxKxD.astype(dtype), seg_q_bxQ.astype(jnp.int32),
        seg_k_bxK.astype(jnp.int32), lse_bxHxQ.astype(F32), do_bxHxQxD.astype(dtype), delta_bxHxQ.astype(F32))
    return dq.astype(F32) * scale, dk.astype(F32), dv.astype(F32)
