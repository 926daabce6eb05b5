"""Segment ids inside the float32 buffers of the sequence-parallel exchanges, so that states, halos
and ids travel in one collective.

An int32 id is split into its high and low 16 bits, each a float32 integer of magnitude < 2^16
(exact). Bit-casting the id instead would make small ids float32 denormals, which hardware that
flushes denormals to zero may not carry through unchanged.
"""

import jax
import jax.numpy as jnp


def ids_to_float32(ids: jax.Array) -> jax.Array:
    """int ids [...] -> float32 [..., 2] (high, low 16 bits)."""
    ids = ids.astype(jnp.int32)
    return jnp.stack([ids >> 16, ids & 0xFFFF], axis=-1).astype(jnp.float32)


def float32_to_ids(packed: jax.Array) -> jax.Array:
    """float32 [..., 2] from `ids_to_float32` -> int32 ids [...]."""
    halves = jax.lax.stop_gradient(packed).astype(jnp.int32)
    return (halves[..., 0] << 16) | halves[..., 1]
