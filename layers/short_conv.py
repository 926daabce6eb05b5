"""Short causal depthwise convolution (the width-4 conv of Mamba / Mamba-2, Gu & Dao 2023).

    y[t, c] = bias[c] + sum_{i=0}^{W-1} weight[i, c] * x[t - W + 1 + i, c]

over channels `c` (any trailing shape), with x[s] taken from the carried `state` (the last W - 1
inputs of the previous call, zeros at the start) for s < 0. With `segment_ids [B, T]` an input
from another segment contributes nothing, so a packed document sees zeros before its first token,
as if it started the sequence. The carried inputs belong to the first segment, unless
`state_segment_ids [B, W - 1]` gives their own ids (sequence parallelism: the W - 1 tokens before a
chunk, fetched from another device, may belong to another document). Shapes: x `[B, T, *C]`,
weight `[W, *C]`, bias `[*C]`, state `[B, W - 1, *C]`.
"""

import jax.numpy as jnp


def short_causal_conv(x_BxTxC: jnp.ndarray, weight_WxC: jnp.ndarray, bias_C: jnp.ndarray, *,
                      segment_ids: jnp.ndarray | None = None, state: jnp.ndarray | None = None,
                      state_segment_ids: jnp.ndarray | None = None):
    """Returns (y `[B, T, *C]` in x's dtype, the new state `[B, W - 1, *C]`)."""
    B, T = x_BxTxC.shape[:2]
    W = weight_WxC.shape[0]
    channels = x_BxTxC.shape[2:]
    if state is None:
        state = jnp.zeros((B, W - 1, *channels), x_BxTxC.dtype)
    padded = jnp.concatenate([state.astype(x_BxTxC.dtype), x_BxTxC], axis=1)  # [B, W - 1 + T, *C]
    f32 = jnp.float32
    weight = weight_WxC.astype(f32)
    y = jnp.broadcast_to(bias_C.astype(f32), x_BxTxC.shape)
    if segment_ids is not None:
        if state_segment_ids is None:  # the carried state (if any) belongs to the first segment
            state_segment_ids = jnp.repeat(segment_ids[:, :1], W - 1, axis=1)
        seg_padded = jnp.concatenate([state_segment_ids.astype(segment_ids.dtype), segment_ids], axis=1)
    extra = (None,) * len(channels)
    for i in range(W):
        shift = W - 1 - i  # weight[i] multiplies x[t - shift]
        tap = padded[:, i:i + T].astype(f32) * weight[i]
        if segment_ids is not None and shift:
            same_BxT = seg_padded[:, i:i + T] == segment_ids
            tap = tap * same_BxT[(...,) + extra]
        y = y + tap
    return y.astype(x_BxTxC.dtype), padded[:, T:]
