"""The state-passing core shared by the linear, gated and state-space mixers.

Every such mixer reduces to the decayed linear recurrence of `pallas_kernels.linear_attention`:

    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,    o_t = scale * q_t S_t

with q, k `[B, T, H, K]`, v `[B, T, H, V]`, g None, `[B, T, H]` or `[B, T, H, K]`, and the state S
`[B, H, K, V]` in float32. Training calls the chunked op; decoding carries S in the cache, one
token at a time through `recurrent_step` (the recurrence itself, written independently of the op)
or several at a time through the op with `initial_state` (a prefill). Under a mesh whose `seq` axis
has more than one device, training runs LASP-2 (layers/linear/lasp2.py) on inputs in the
zigzag order of layers/sequence_parallel/layout.py; otherwise the op runs partitioned over rows and
heads (layers/partitioned.py).
"""

import jax
import jax.numpy as jnp

from hybrax.layers.partitioned import linear_attention
from hybrax.layers.linear.lasp2 import linear_attention_sequence_parallel
from hybrax.layers.sequence_parallel.layout import seq_size


def recurrent_step(q_BxHxK, k_BxHxK, v_BxHxV, log_decay, state_BxHxKxV, scale: float):
    """One step of the recurrence; returns (o `[B, H, V]` in v's dtype, new float32 state)."""
    f32 = jnp.float32
    state = state_BxHxKxV.astype(f32)
    if log_decay is not None:
        decay = jnp.exp(log_decay.astype(f32))
        state = state * (decay[..., None, None] if decay.ndim == 2 else decay[..., None])
    state = state + jnp.einsum("bhk,bhv->bhkv", k_BxHxK.astype(f32), v_BxHxV.astype(f32))
    o_BxHxV = scale * jnp.einsum("bhk,bhkv->bhv", q_BxHxK.astype(f32), state)
    return o_BxHxV.astype(v_BxHxV.dtype), state


def mix(q_BxTxHxK, k_BxTxHxK, v_BxTxHxV, log_decay, *, scale: float, segment_ids, state, chunk_size: int,
        implementation):
    """The chunked op without a state (training; LASP-2 over `seq` when the mesh splits it), or the
    recurrence from `state` (decoding).

    Returns (o `[B, T, H, V]`, new state or None).
    """
    if state is None and seq_size() > 1:
        return linear_attention_sequence_parallel(q_BxTxHxK, k_BxTxHxK, v_BxTxHxV, log_decay, scale=scale,
                                                  segment_ids=segment_ids, chunk_size=chunk_size,
                                                  implementation=implementation), None
    if state is None:
        o, _ = linear_attention(q_BxTxHxK, k_BxTxHxK, v_BxTxHxV, log_decay, scale=scale, segment_ids=segment_ids,
                                chunk_size=chunk_size, implementation=implementation)
        return o, None
    if q_BxTxHxK.shape[1] == 1:
        step_decay = None if log_decay is None else log_decay[:, 0]
        o_BxHxV, state = recurrent_step(q_BxTxHxK[:, 0], k_BxTxHxK[:, 0], v_BxTxHxV[:, 0], step_decay, state, scale)
        return o_BxHxV[:, None], state
    return linear_attention(q_BxTxHxK, k_BxTxHxK, v_BxTxHxV, log_decay, scale=scale, initial_state=state,
                            return_final_state=True, chunk_size=chunk_size, implementation=implementation)


def check_decoding(segment_ids, cache) -> None:
    if cache is not None and segment_ids is not None:
        raise ValueError("segment_ids are not supported while decoding from a cache; decode one sequence per row")


def chunked_flops_per_token(num_heads: int, key_dim: int, value_dim: int, seq_len: int, chunk_size: int) -> int:
    """FLOPs per token of the chunked form (2 per multiply-add), per layer.

    With C = min(chunk_size, seq_len), per head: the intra-chunk scores q k^T (C K multiply-adds per
    token) and their product with v (C V), the inter-chunk read q S (K V) and the state update
    k^T v (K V). Per-key-channel gates (GLA) cost the same on the op's factored path, which runs
    while every chunk's gates sum to >= -40 per channel (GLA's logsigmoid / 16 gates start near
    -0.04 per step, -2.8 per chunk of 64); its exact fallback (secondary chunking) does about
    c (c + 4) K more per token and head (c = 16), and XLA's cost analysis counts that branch too.
    Elementwise work (gates, norms, activations) is not counted.
    """
    C = min(chunk_size, seq_len)
    return num_heads * 2 * (C * key_dim + C * value_dim + 2 * key_dim * value_dim)


def initial_state(batch: int, num_heads: int, key_dim: int, value_dim: int) -> jax.Array:
    return jnp.zeros((batch, num_heads, key_dim, value_dim), jnp.float32)
