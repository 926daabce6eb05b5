"""Parameters declared once: shape, dtype, initializer and logical axis names.

Logical names (`embed`, `heads`, `kv_heads`, `head_dim`, `mlp`, `vocab`, `experts`) are stored as
the flax `out_sharding` metadata of each `nnx.Param`; `train.sharding` maps them to mesh axes with
one rules table. Eager sharding is off so that layers build in a notebook with no mesh; sharded
creation happens by jitting the constructor with the shardings derived from these names.
"""

from collections.abc import Callable, Sequence

import math

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]


def logical_param(
    rngs: nnx.Rngs,
    initializer: Initializer,
    shape: Sequence[int],
    param_dtype: jnp.dtype,
    axes: Sequence[str | None],
) -> nnx.Param:
    """A parameter of `shape` named by logical `axes` (one name per dimension)."""
    if len(axes) != len(shape):
        raise ValueError(f"axes={tuple(axes)} must name each of the {len(shape)} dims of shape={tuple(shape)}")
    value = initializer(rngs.params(), tuple(shape), jnp.dtype(param_dtype))
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


def normal(std: float) -> Initializer:
    return jax.nn.initializers.normal(stddev=std)


def ones() -> Initializer:
    return jax.nn.initializers.ones


def constant(value: float) -> Initializer:
    return lambda key, shape, dtype: jnp.full(shape, value, dtype)


def uniform(low: float, high: float) -> Initializer:
    return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, low, high)


def linspace(low: float, high: float) -> Initializer:
    """Evenly spaced from `low` to `high` along the first dimension (e.g. per-head gate biases)."""
    def init(key, shape, dtype):
        del key
        values = jnp.linspace(low, high, shape[0], dtype=jnp.float32).reshape((shape[0],) + (1,) * (len(shape) - 1))
        return jnp.broadcast_to(values, shape).astype(dtype)
    return init


def dt_bias(dt_min: float, dt_max: float) -> Initializer:
    """softplus^-1 of dt ~ exp(U[log dt_min, log dt_max]), so that softplus(dt_bias) starts there
    (Mamba's time-step initialisation; Gated DeltaNet's decay uses it too)."""
    def init(key, shape, dtype):
        dt = jnp.exp(jax.random.uniform(key, shape, jnp.float32, math.log(dt_min), math.log(dt_max)))
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)
    return init


def log_uniform(low: float, high: float) -> Initializer:
    """log of U[low, high] (Mamba-2's A_log with A ~ U[1, 16])."""
    return lambda key, shape, dtype: jnp.log(jax.random.uniform(key, shape, jnp.float32, low, high)).astype(dtype)
