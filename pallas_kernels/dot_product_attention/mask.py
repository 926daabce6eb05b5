"""Which key each query may see. The one precedence rule of the op:

    allowed[b, i, j] = causal(i, j) AND same_segment(b, i, j) AND mask[b, i, j]

Every given condition must hold; none overrides another. With `causal`, query i sits at key
position i + (Tk - Tq) (bottom-right alignment), so a block of new queries at the end of a longer
key sequence sees all earlier keys.
"""

import jax.numpy as jnp


def allowed_mask(batch: int, q_len: int, kv_len: int, *, causal: bool, segment_ids=None,
                 mask=None) -> jnp.ndarray | None:
    """Boolean [B, Tq, Tk] (or None when everything is allowed)."""
    allowed = None
    if causal:
        q_pos = jnp.arange(q_len)[:, None] + (kv_len - q_len)
        allowed = jnp.broadcast_to(q_pos >= jnp.arange(kv_len)[None, :], (batch, q_len, kv_len))
    if segment_ids is not None:
        same = segment_ids[:, :, None] == segment_ids[:, None, :]
        allowed = same if allowed is None else allowed & same
    if mask is not None:
        mask = jnp.broadcast_to(mask.astype(bool), (batch, q_len, kv_len))
        allowed = mask if allowed is None else allowed & mask
    return allowed


def check_inputs(q, k, v, segment_ids, mask) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [batch, time, heads, dim]; got {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"k {k.shape} and v {v.shape} must match each other and q {q.shape} in batch and dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads={q.shape[2]} must be a multiple of key/value heads={k.shape[2]}")
    if segment_ids is not None and (q.shape[1] != k.shape[1] or segment_ids.shape != q.shape[:2]):
        raise ValueError(f"segment_ids {segment_ids.shape} needs q and k of equal length; q {q.shape}, k {k.shape}")
    if mask is not None and mask.ndim not in (2, 3):
        raise ValueError(f"mask must be [Tq, Tk] or [B, Tq, Tk]; got shape {mask.shape}")
