"""Dense softmax attention behind the implementation switch.

`dot_product_attention(q [B, Tq, H, D], k [B, Tk, Hkv, D], v [B, Tk, Hkv, D], *, causal=True,
scale=None, segment_ids=None [B, T], mask=None [B?, Tq, Tk], implementation=None) -> o [B, Tq, H, D]`

Which keys a query sees is decided by one rule (mask.py): causal AND same segment AND mask.
Implementations: `reference` (definition, float32), `xla` (jax.nn.dot_product_attention, XLA),
`cudnn` (fused cuDNN kernel on GPU). Default order: GPU tries cudnn then xla; elsewhere xla.
"""

from collections.abc import Sequence

import jax.numpy as jnp

from pallas_kernels.dot_product_attention import cudnn, reference, xla
from pallas_kernels.dot_product_attention.mask import check_inputs
from pallas_kernels.implementation import dispatch

IMPLEMENTATIONS = {
    "reference": reference.dot_product_attention,
    "xla": xla.dot_product_attention,
    "cudnn": cudnn.dot_product_attention,
}
DEFAULTS = {"gpu": ("cudnn", "xla"), "default": ("xla",)}


def dot_product_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, *, causal: bool = True,
                          scale: float | None = None, segment_ids: jnp.ndarray | None = None,
                          mask: jnp.ndarray | None = None,
                          implementation: str | Sequence[str] | None = None) -> jnp.ndarray:
    check_inputs(q, k, v, segment_ids, mask)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return dispatch("dot_product_attention", IMPLEMENTATIONS, DEFAULTS, implementation, q, k, v,
                    causal=causal, scale=scale, segment_ids=segment_ids, mask=mask)
