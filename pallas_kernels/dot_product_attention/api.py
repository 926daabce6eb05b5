"""Dense softmax attention behind the implementation switch.

`dot_product_attention(q [B, Tq, H, D], k [B, Tk, Hkv, D], v [B, Tk, Hkv, D], *, causal=True,
scale=None, segment_ids=None [B, T], mask=None [B?, Tq, Tk], implementation=None) -> o [B, Tq, H, D]`

Which keys a query sees is decided by one rule (mask.py): causal AND same segment AND mask.

Implementations:
- `reference`: the definition, float32, [B, H, Tq, Tk] scores (the oracle).
- `xla`: jax.nn.dot_product_attention with XLA's own fusion; takes everything, but with segment
  ids or a mask it materialises the [B, H, Tq, Tk] scores.
- `cudnn`: cuDNN's fused kernel on GPU, 16-bit inputs, no segment ids or mask (cudnn.py says why).
- `splash`: jax's splash attention on TPU (splash.py), fused: O(T) memory, with packed segment
  ids and GQA; TPU interpret mode on a CPU.
- `pallas_gpu`: hybrax's block-sparse Pallas GPU kernel with every causal key block listed
  (block_sparse.py), fused, with segment ids and GQA; Pallas interpret mode on a CPU.
The two fused kernels refuse an explicit mask and causal Tq != Tk (decoding against a KV cache),
which fall through to xla.

Default order (`auto` keeps only those verified on the backend, pallas_kernels/verified.py):
TPU (splash, xla); GPU (cudnn, pallas_gpu, xla); elsewhere xla.
"""

from collections.abc import Sequence

import jax.numpy as jnp

from hybrax.pallas_kernels.dot_product_attention import cudnn, reference, xla
from hybrax.pallas_kernels.dot_product_attention.mask import check_inputs
from hybrax.pallas_kernels.implementation import dispatch, lazy_backend

IMPLEMENTATIONS = {
    "reference": reference.dot_product_attention,
    "xla": xla.dot_product_attention,
    "cudnn": cudnn.dot_product_attention,
    "splash": lazy_backend("hybrax.pallas_kernels.dot_product_attention", "splash", "dot_product_attention"),
    "pallas_gpu": lazy_backend("hybrax.pallas_kernels.dot_product_attention", "block_sparse", "dot_product_attention"),
}
DEFAULTS = {"tpu": ("splash", "xla"), "gpu": ("cudnn", "pallas_gpu", "xla"), "default": ("xla",)}


def dot_product_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, *, causal: bool = True,
                          scale: float | None = None, segment_ids: jnp.ndarray | None = None,
                          mask: jnp.ndarray | None = None,
                          implementation: str | Sequence[str] | None = None) -> jnp.ndarray:
    check_inputs(q, k, v, segment_ids, mask)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return dispatch("dot_product_attention", IMPLEMENTATIONS, DEFAULTS, implementation, q, k, v,
                    causal=causal, scale=scale, segment_ids=segment_ids, mask=mask)
