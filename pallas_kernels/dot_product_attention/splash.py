"""Fused (flash) softmax attention on TPU through jax's splash attention kernel.

Splash attention (jax.experimental.pallas.ops.tpu.splash_attention; the block-sparse flash
attention of FlashAttention-2, Dao 2023, written for the TPU's MXU) computes, per query block and
without ever holding the [T, T] scores,

    o_i = sum_j softmax_j(q_i.k_j) v_j    over the keys j with causal(i, j) AND seg_q[i] == seg_kv[j]

with an online softmax over key blocks, and recomputes p = exp(s - lse) block by block in its dq
and dk/dv backward kernels. Memory is O(T) per head instead of O(T^2).

This wrapper maps the op's contract onto it:

- layout: q [B, T, H, D] -> splash's [H, T, D] per batch row, vmapped over B (the kernel has no
  batch axis; vmap adds a grid dimension); o comes back as [B, T, H, D] in q's dtype.
- scale: splash has none, so q is multiplied by `scale` first (in float32, rounded once to the
  compute dtype).
- GQA: splash's MHA kernel takes k, v [Hkv, T, D] with H a multiple of Hkv and maps query head h
  to key/value head h // (H / Hkv) in its index maps, summing dk, dv over the group inside its
  dk/dv kernel. So neither `jnp.repeat` of the heads (H / Hkv times the key/value memory and
  bandwidth) nor a vmap of the MQA kernel over groups (Hkv separate grids) is needed. Hkv = 1 runs
  the same MHA kernel with one key/value head.
- lengths: the kernel tiles T in blocks that are multiples of 128 (its segment-id tiles are 128
  lanes wide). T is padded up to a multiple of the block; the padding is its own segment (id
  max(segment_ids) + 1), and with causal=True it lies after every real token anyway, so no real
  query sees a padded key. Padded queries see at least themselves; their rows are cut off and
  receive zero cotangents, so they add nothing to dk, dv. Any T >= 1 runs.
- block size: min(512, T rounded up to 128) when that fits in one block, else the largest of 512,
  256, 128 that divides the padded length (forward, dq and dk/dv kernels alike; the separate dq
  kernel, not the fused backward, whose dq partials take T / block copies of q).
- every query sees itself (causal or full, own segment, padding its own segment), so no row is
  fully masked; queries with no visible key cannot arise because explicit masks are refused.

Refused with NotImplementedError (the switch falls through to xla): an explicit `mask`, Tq != Tk,
and a backend other than TPU except a CPU, where the kernel runs in Pallas' TPU interpret mode.
float32 inputs use the MXU's default precision on hardware (bfloat16 passes), as splash does.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from hybrax.pallas_kernels.implementation import interpret_mode

LANES = 128          # splash's tiles: block sizes must be multiples of this
MAX_BLOCK = 512


def block_size_for(length: int) -> int:
    """The default square block for a sequence of `length` (see the module docstring)."""
    padded = -(-length // LANES) * LANES
    if padded <= MAX_BLOCK:
        return padded
    return next(b for b in (MAX_BLOCK, 256, LANES) if padded % b == 0)


@functools.lru_cache(maxsize=32)
def _mask(padded_len: int, heads: int, causal: bool) -> splash_mask.MultiHeadMask:
    """One mask object per shape: splash caches its numpy block tables (~3 s at T = 32768) per
    mask, so every trace after the first finds them."""
    one_head = (splash_mask.CausalMask if causal else splash_mask.FullMask)((padded_len, padded_len))
    return splash_mask.MultiHeadMask([one_head] * heads)


def make_kernel(padded_len: int, heads: int, block: int, causal: bool, interpret) -> splash.SplashAttentionKernel:
    """Splash MHA kernel for [heads, padded_len, D] queries, made anew in each trace: its tables
    become that trace's constants (a kernel kept across traces would leak one trace's values into
    the next; built eagerly instead, they would need a device, which an AOT compile for a TPU
    topology does not have)."""
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                              block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                              block_q_dq=block, block_kv_dq=block)
    return splash.make_splash_mha(_mask(padded_len, heads, causal), block_sizes=sizes, head_shards=1,
                                  q_seq_shards=1, interpret=interpret)


def over_batch(fn, *, interpret):
    """`fn` over the batch rows: vmap (a grid dimension of the kernel), or lax.map under
    `pltpu.InterpretParams()`, whose interpreter in jax 0.10 rejects a vmapped grid dimension."""
    if isinstance(interpret, pltpu.InterpretParams):
        return lambda *rows: jax.lax.map(lambda row: fn(*row), rows)
    return jax.vmap(fn)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool, scale: float,
                     segment_ids: jax.Array | None, interpret=False, block_size: int | None = None) -> jax.Array:
    """q [B, T, H, D], k, v [B, T, Hkv, D], segment_ids int [B, T] or None -> o [B, T, H, D].

    `interpret`: False (Mosaic), True or `pltpu.InterpretParams()` (TPU interpret mode on a CPU)."""
    B, T, H, D = q.shape
    block = block_size_for(T) if block_size is None else block_size
    if block % LANES:
        raise ValueError(f"splash block_size={block} must be a multiple of {LANES}")
    padded = -(-T // block) * block
    dtype = jnp.result_type(q, k, v)
    q_scaled = (q.astype(jnp.float32) * scale).astype(dtype)

    def heads_major(x):  # [B, T, h, D] -> [B, h, padded, D]
        return jnp.pad(jnp.swapaxes(x.astype(dtype), 1, 2), ((0, 0), (0, 0), (0, padded - T), (0, 0)))

    q_BxHxTxD, k_BxGxTxD, v_BxGxTxD = heads_major(q_scaled), heads_major(k), heads_major(v)
    kernel = make_kernel(padded, H, block, bool(causal), interpret)
    per_row = functools.partial(over_batch, interpret=interpret)
    if segment_ids is None and padded == T:
        o_BxHxTxD = per_row(kernel)(q_BxHxTxD, k_BxGxTxD, v_BxGxTxD)
    else:
        seg_BxT = jnp.zeros((B, T), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
        padding_id = jnp.max(seg_BxT) + 1
        seg_BxT = jnp.concatenate([seg_BxT, jnp.broadcast_to(padding_id, (B, padded - T))], axis=1)

        def one_row(q, k, v, seg):
            return kernel(q, k, v, segment_ids=splash.SegmentIds(q=seg, kv=seg))
        o_BxHxTxD = per_row(one_row)(q_BxHxTxD, k_BxGxTxD, v_BxGxTxD, seg_BxT)
    return jnp.swapaxes(o_BxHxTxD[:, :, :T], 1, 2).astype(q.dtype)


def dot_product_attention(q, k, v, *, causal, scale, segment_ids, mask):
    """The op's implementation `splash` (see the module docstring for what it refuses)."""
    if mask is not None:
        raise NotImplementedError("splash takes causal/full attention with segment ids, not an explicit mask")
    if q.shape[1] != k.shape[1]:
        raise NotImplementedError(f"splash needs as many queries as keys; got Tq={q.shape[1]}, Tk={k.shape[1]}")
    interpret = interpret_mode("splash dot_product_attention", "tpu")
    return splash_attention(q, k, v, causal=causal, scale=scale, segment_ids=segment_ids, interpret=interpret)
