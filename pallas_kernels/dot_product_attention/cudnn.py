"""cuDNN fused attention through jax.nn.dot_product_attention (GPU, 16-bit inputs, causal or full,
no segment ids or explicit mask): anything else raises NotImplementedError and falls through
(packed segments to `pallas_gpu`, then xla).

Why no packed segments here: jax.nn.dot_product_attention's `query_seq_lengths` /
`key_value_seq_lengths` describe one padded sequence per batch row, not several documents packed
in a row. cuDNN's packed (THD) layout does take documents, but only through jax's private
`jax._src.cudnn.fused_attention_stablehlo.dot_product_attention(q_seqlen [B, M], q_offsets
[B, M + 1], ...)`: it needs a static bound M on the documents per row, contiguous segments (the
op's rule is only "same segment id"), offsets computed from segment_ids, and a Hopper GPU. A
wrapper over a private API that no test here can run (no GPU) would be unverified; the fused
`pallas_gpu` path takes segment ids instead.
"""

import jax
import jax.numpy as jnp

from hybrax.pallas_kernels.implementation import current_backend


def dot_product_attention(q, k, v, *, causal, scale, segment_ids, mask):
    if current_backend() != "gpu":
        raise NotImplementedError(f"cudnn needs a GPU, backend is {current_backend()}")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise NotImplementedError(f"cudnn needs bfloat16/float16 inputs, got {q.dtype}")
    if segment_ids is not None or mask is not None or (causal and q.shape[1] != k.shape[1]):
        raise NotImplementedError("cudnn path takes only square causal or full attention")
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal, implementation="cudnn")
