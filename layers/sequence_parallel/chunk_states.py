"""Inside `shard_map` over `seq`: exchanging one small record per local chunk (a final state, a
decay, segment ids at its ends) so that every device sees all 2P chunks in natural order.

The state-passing paths (LASP-2 for the linear family, layers/linear/delta_rule_parallel.py and
mlstm_parallel.py) each pack their per-chunk record into one float32 buffer [2, b, n] (this
device's two zigzag chunks, layout.py), gather it with ONE `all_gather` (its transpose, a
reduce-scatter, is the backward), run a prefix over the chunks in natural order and keep the
entries of their own two chunks. Segment ids travel as float32 bit patterns (packing.py).
"""

import jax
import jax.numpy as jnp

from hybrax.layers.sequence_parallel.layout import SEQ_AXIS
from hybrax.layers.sequence_parallel.packing import float32_to_ids, ids_to_float32


def natural_order(gathered):
    """[P, 2, ...] all-gathered per device and local chunk -> [2P, ...] in natural chunk order."""
    return jnp.concatenate([gathered[:, 0], gathered[::-1, 1]], axis=0)


def gather_chunks(packed_2xbxn):
    """This device's two chunk records [2, b, n] -> every chunk's, [2P, b, n] in natural order."""
    return natural_order(jax.lax.all_gather(packed_2xbxn, SEQ_AXIS))


def pick_local(all_chunks):
    """[2P, ...] -> [2, ...]: this device's chunks d and 2P - 1 - d."""
    d = jax.lax.axis_index(SEQ_AXIS)
    return jnp.stack([all_chunks[d], all_chunks[all_chunks.shape[0] - 1 - d]])


def segment_bounds(segment_ids_2bxc):
    """(first, last) segment id of each stacked local chunk, [2b, 2] int32 (zeros without ids: one
    segment, every seam continues)."""
    if segment_ids_2bxc is None:
        return None
    return jnp.stack([segment_ids_2bxc[:, 0], segment_ids_2bxc[:, -1]], axis=1).astype(jnp.int32)


def pack_bounds(bounds_2bx2, two_b):
    """[2b, 2] int32 (or None) -> [2b, 4] float32 for the packed record."""
    if bounds_2bx2 is None:
        bounds_2bx2 = jnp.zeros((two_b, 2), jnp.int32)
    return ids_to_float32(bounds_2bx2).reshape(two_b, 4)


def seams_continue(packed_bounds_2Pxbx4):
    """Gathered bounds -> keep [2P, b] float32: 1 where chunk j's first token continues the segment
    that chunk j - 1 ends with (the state crosses the seam), 0 for chunk 0 and at a new segment."""
    bounds = float32_to_ids(packed_bounds_2Pxbx4.reshape(*packed_bounds_2Pxbx4.shape[:2], 2, 2))  # [2P, b, 2]
    continues = bounds[1:, :, 0] == bounds[:-1, :, 1]
    return jnp.concatenate([jnp.zeros_like(continues[:1]), continues]).astype(jnp.float32)


def survives(segment_ids_2bxc, two_b):
    """1.0 where no segment starts in the chunk after its first token (a state entering the chunk
    reaches its end), [2b] float32."""
    if segment_ids_2bxc is None:
        return jnp.ones((two_b,), jnp.float32)
    starts = segment_ids_2bxc[:, 1:] != segment_ids_2bxc[:, :-1]
    return (~jnp.any(starts, axis=1)).astype(jnp.float32)


def split_local(x):
    """[2b, ...] stacked local chunks -> [2, b, ...] (this device's two chunk slots)."""
    return x.reshape(2, x.shape[0] // 2, *x.shape[1:])
