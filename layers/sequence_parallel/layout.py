"""The zigzag token order of sequence parallelism (causal load balancing).

With P devices on the mesh axis `seq`, the sequence of length T is cut into 2P chunks of
c = T / (2P) tokens and device d holds chunks d and 2P - 1 - d, in that order:

    P = 2, T = 8:  natural 0 1 2 3 4 5 6 7  ->  stored 0 1 6 7 | 2 3 4 5   (device 0 | device 1)

so that under a causal mask every device has the same amount of attention work. The order is
applied once, at the data input (`to_zigzag` on every [B, T] batch array: tokens, targets,
segment_ids, positions, loss_mask); token-wise layers do not care, and each sequence-parallel
mixer knows which natural positions its local rows hold (`local_positions`). With P = 1 the order
is the natural one.
"""

import jax
import jax.numpy as jnp
import numpy as np

from hybrax.layers.sharding import axis_size

SEQ_AXIS = "seq"


def seq_size() -> int:
    """Devices on the `seq` axis of the current mesh (1 without a mesh)."""
    return axis_size(SEQ_AXIS)


def check_length(seq_len: int, num_devices: int) -> None:
    if seq_len % (2 * num_devices):
        raise ValueError(f"sequence length {seq_len} must be a multiple of 2 * seq = {2 * num_devices} to split "
                         f"over the mesh axis seq={num_devices} in zigzag order")


def zigzag_order(seq_len: int, num_devices: int) -> np.ndarray:
    """order[s] = natural position of the token stored at position s, int32 [T]."""
    check_length(seq_len, num_devices)
    c = seq_len // (2 * num_devices)
    chunks = [np.r_[d * c:(d + 1) * c, (2 * num_devices - 1 - d) * c:(2 * num_devices - d) * c]
              for d in range(num_devices)]
    return np.concatenate(chunks).astype(np.int32)


def to_zigzag(x, num_devices: int, axis: int = 1):
    """Natural order -> stored (zigzag) order along `axis` (numpy or jax arrays)."""
    if num_devices == 1:
        return x
    order = zigzag_order(x.shape[axis], num_devices)
    return jnp.take(x, order, axis=axis) if isinstance(x, jax.Array) else np.take(x, order, axis=axis)


def from_zigzag(x, num_devices: int, axis: int = 1):
    """Stored (zigzag) order -> natural order along `axis`."""
    if num_devices == 1:
        return x
    inverse = np.argsort(zigzag_order(x.shape[axis], num_devices)).astype(np.int32)
    return jnp.take(x, inverse, axis=axis) if isinstance(x, jax.Array) else np.take(x, inverse, axis=axis)


def local_chunks(num_devices: int):
    """Inside `shard_map` over `seq`: the natural chunk indices (d, 2P - 1 - d) of this device's two
    halves, traced int32 scalars."""
    d = jax.lax.axis_index(SEQ_AXIS)
    return d, 2 * num_devices - 1 - d


def local_positions(local_len: int, num_devices: int) -> jax.Array:
    """Inside `shard_map` over `seq`: the natural positions of this device's `local_len` rows, [T/P]."""
    c = local_len // 2
    first, second = local_chunks(num_devices)
    offsets = jnp.arange(c, dtype=jnp.int32)
    return jnp.concatenate([first * c + offsets, second * c + offsets])


def default_positions(batch: int, seq_len: int, num_devices: int, start=0) -> jax.Array:
    """Positions [B, T] when the caller gives none: start + the natural position of each stored row
    (the zigzag order when num_devices > 1)."""
    order = np.arange(seq_len) if num_devices == 1 else zigzag_order(seq_len, num_devices)
    return jnp.broadcast_to(start + jnp.asarray(order, jnp.int32), (batch, seq_len))
