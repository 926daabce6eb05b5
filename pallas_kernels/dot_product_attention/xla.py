"""jax.nn.dot_product_attention with XLA's own fusion: the path for CPU and TPU-less backends."""

import jax
import jax.numpy as jnp

from hybrax.pallas_kernels.dot_product_attention.mask import allowed_mask


def dot_product_attention(q, k, v, *, causal, scale, segment_ids, mask):
    B, Tq = q.shape[:2]
    Tk = k.shape[1]
    square_causal = causal and Tq == Tk
    allowed = allowed_mask(B, Tq, Tk, causal=causal and not square_causal, segment_ids=segment_ids, mask=mask)
    out = jax.nn.dot_product_attention(
        q, k, v, mask=None if allowed is None else allowed[:, None], scale=scale,
        is_causal=square_causal, implementation="xla")
    if mask is not None:  # a query with no allowed key gets zeros, as in the reference
        any_allowed_BxT = jnp.any(allowed, axis=-1)
        out = jnp.where(any_allowed_BxT[:, :, None, None], out, 0)
    return out
