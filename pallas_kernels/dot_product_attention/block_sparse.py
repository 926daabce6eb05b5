"""Fused (flash) softmax attention on GPU through hybrax's block-sparse attention kernel.

FlashAttention-2 (Dao 2023) is block-sparse attention with every needed key block listed: query
block n (rows [n b, (n + 1) b)) visits key blocks m = 0..n when causal (all of them otherwise),

    block_indices[b, h, n, m] = m if m <= n (or not causal) else -1        int32 [B, H, Nq, Nk]

and `pallas_kernels.block_sparse_attention` with implementation="pallas_gpu" (a Pallas Triton
kernel: online softmax forward, dq and dk/dv backward kernels recomputing p = exp(s - lse), GQA
summed inside the dk/dv kernel, packed segments and the causal diagonal masked per element, rows
beyond T masked by position) does the rest. Memory is O(T) per head plus the O((T / b)^2) int32
block lists, never the [T, T] scores. Square blocks of b = 64 (T's power of two >= 16 when
smaller); any T >= 1 runs.

Refused with NotImplementedError (the switch falls through): an explicit `mask`, causal attention
with Tq != Tk (the op aligns queries to the end of the keys, the block-sparse kernel to the start),
and a backend other than GPU except a CPU, where the kernel runs in Pallas interpret mode. The
backend is checked here, before the inner dispatch, so a TPU target falls through to the next
dot_product_attention implementation rather than to block_sparse_attention's own.
"""

import jax
import jax.numpy as jnp

from hybrax.pallas_kernels.block_sparse_attention import block_sparse_attention
from hybrax.pallas_kernels.implementation import interpret_mode

BLOCK = 64


def block_size_for(length: int) -> int:
    return min(BLOCK, max(16, 1 << (length - 1).bit_length()))


def all_blocks(batch: int, heads: int, q_len: int, kv_len: int, block: int, causal: bool) -> jax.Array:
    """int32 [B, H, Nq, Nk]: every key block each query block needs, -1 for future ones."""
    num_q, num_kv = -(-q_len // block), -(-kv_len // block)
    kv_blocks = jnp.arange(num_kv, dtype=jnp.int32)[None, :]
    lists_NqxNk = jnp.broadcast_to(kv_blocks, (num_q, num_kv))
    if causal:
        lists_NqxNk = jnp.where(kv_blocks <= jnp.arange(num_q, dtype=jnp.int32)[:, None], kv_blocks, -1)
    return jnp.broadcast_to(lists_NqxNk, (batch, heads, num_q, num_kv))


def dot_product_attention(q, k, v, *, causal, scale, segment_ids, mask):
    """The op's implementation `pallas_gpu` (see the module docstring for what it refuses)."""
    if mask is not None:
        raise NotImplementedError("pallas_gpu takes causal/full attention with segment ids, not an explicit mask")
    B, Tq, H, _ = q.shape
    Tk = k.shape[1]
    if causal and Tq != Tk:
        raise NotImplementedError(f"pallas_gpu takes causal attention with Tq == Tk only; got Tq={Tq}, Tk={Tk}")
    interpret_mode("pallas_gpu dot_product_attention", "gpu")   # refuses a TPU target here
    block = block_size_for(max(Tq, Tk))
    return block_sparse_attention(q, k, v, all_blocks(B, H, Tq, Tk, block, causal), block_size=block,
                                  causal=causal, scale=scale, segment_ids=segment_ids,
                                  implementation="pallas_gpu")
