"""Softmax attention by definition, float32: o_i = sum_j softmax_j(scale * q_i.k_j) v_j over the
allowed keys (see mask.py). Grouped-query attention repeats each key/value head for its group.
Queries with no allowed key return zeros."""

import jax
import jax.numpy as jnp

from hybrax.pallas_kernels.dot_product_attention.mask import allowed_mask


def dot_product_attention(q, k, v, *, causal, scale, segment_ids, mask):
    B, Tq, H, D = q.shape
    groups = H // k.shape[2]
    k_BxSxHxD = jnp.repeat(k, groups, axis=2).astype(jnp.float32)
    v_BxSxHxD = jnp.repeat(v, groups, axis=2).astype(jnp.float32)
    scores_BxHxTxS = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k_BxSxHxD) * scale
    allowed_BxTxS = allowed_mask(B, Tq, k.shape[1], causal=causal, segment_ids=segment_ids, mask=mask)
    if allowed_BxTxS is not None:
        scores_BxHxTxS = jnp.where(allowed_BxTxS[:, None], scores_BxHxTxS, -jnp.inf)
    weights = jax.nn.softmax(scores_BxHxTxS, axis=-1)
    weights = jnp.where(jnp.isnan(weights), 0.0, weights)  # rows with no allowed key
    return jnp.einsum("bhts,bshd->bthd", weights, v_BxSxHxD).astype(q.dtype)
