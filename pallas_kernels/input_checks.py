"""The one-line input checks the recurrent ops share (linear_attention, delta_rule, mlstm, slstm).

Each raises a ValueError naming the value and what would be valid, before any compute. Checks that
need values (not just shapes) run only on concrete arrays: under `jax.jit`, `grad` or `vmap` the
values are tracers and go unchecked.
"""

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_queries_keys_values(q, k, v) -> tuple[int, int, int, int, int]:
    """q, k [B, T, H, K] and v [B, T, H, V] -> (B, T, H, K, V)."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [batch, time, heads, dim]; got shapes {q.shape}, {k.shape}, {v.shape}")
    if q.shape != k.shape:
        raise ValueError(f"q {q.shape} and k {k.shape} must have the same shape [B, T, H, K]")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v {v.shape} must match q {q.shape} in batch, time and heads")
    return (*q.shape, v.shape[3])


def check_per_head_step(name: str, x, B: int, T: int, H: int) -> None:
    """A scalar per batch row, step and head: [B, T, H]."""
    if x.shape != (B, T, H):
        raise ValueError(f"{name} shape {x.shape} must be [B, T, H] = {(B, T, H)}")


def check_log_decay_values(log_decay) -> None:
    """log_decay <= 0 (decay factors exp(g) <= 1), on concrete arrays."""
    if log_decay is not None and is_concrete(log_decay) and log_decay.size:
        largest = float(np.max(np.asarray(log_decay, np.float32)))
        if largest > 0:
            raise ValueError(f"log_decay must be <= 0 (decay factors exp(g) <= 1); got max {largest}")


def check_segment_ids(segment_ids, B: int, T: int) -> None:
    """None or integer [B, T]."""
    if segment_ids is None:
        return
    if segment_ids.shape != (B, T):
        raise ValueError(f"segment_ids shape {segment_ids.shape} must be [B, T] = {(B, T)}")
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise ValueError(f"segment_ids dtype {segment_ids.dtype} must be an integer dtype")


def check_chunk_size(chunk_size) -> None:
    if not isinstance(chunk_size, (int, np.integer)) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be an integer >= 1")
