"""cuDNN fused attention through jax.nn.dot_product_attention (GPU, 16-bit inputs, causal or full,
no segment ids or explicit mask): anything else raises NotImplementedError and falls through."""

import jax
import jax.numpy as jnp


def dot_product_attention(q, k, v, *, causal, scale, segment_ids, mask):
    if jax.default_backend() != "gpu":
        raise NotImplementedError(f"cudnn needs a GPU, backend is {jax.default_backend()}")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise NotImplementedError(f"cudnn needs bfloat16/float16 inputs, got {q.dtype}")
    if segment_ids is not None or mask is not None or (causal and q.shape[1] != k.shape[1]):
        raise NotImplementedError("cudnn path takes only square causal or full attention")
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal, implementation="cudnn")
