"""Parameters declared once: shape, dtype, initializer and logical axis names.

Logical names (`embed`, `heads`, `kv_heads`, `head_dim`, `mlp`, `vocab`, `experts`) are stored as
the flax `out_sharding` metadata of each `nnx.Param`; `train.sharding` maps them to mesh axes with
one rules table. Eager sharding is off so that layers build in a notebook with no mesh; sharded
creation happens by jitting the constructor with the shardings derived from these names.
"""

from collections.abc import Callable, Sequence

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
