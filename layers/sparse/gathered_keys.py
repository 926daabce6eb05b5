"""Sequence parallelism for the block-sparse mixers (moba, nsa, bilevel_routing_attention,
routing_attention, attention's sparse prefill) by gathered keys and local queries.

Under a mesh with seq = P > 1 a mixer's q, k, v [B, T, ., D] are in stored (zigzag) order,
sharded over `seq` on T (layers/sequence_parallel/layout.py: device d holds the natural chunks d
and 2P - 1 - d of c = T / (2P) tokens). `attend_with_gathered_keys` runs the mixer's selection and
block-sparse attention inside `jax.shard_map`:

    queries stay local   q [B, T/P, H, D]: this device's 2c/b query blocks, at the natural block
                         indices query_block_Q = (d c/b + i, (2P - 1 - d) c/b + i), i < c/b
    keys are gathered    k, v [B, T, Hkv, D] (and segment ids [B, T]) all-gathered over seq and put
                         back in natural order (`gather_natural`): one all-gather of K and of V
    outputs              o [B, T/P, H, D] for the local rows only, in stored order

so block indices, causal masks and segment tests all work in natural positions, and each device
computes only its own queries' selection and attention. The all-gather's transpose (a
reduce-scatter) brings dk and dv back to their devices. A query block must not straddle two
chunks: c must be a multiple of the block size (`check_chunks`). Batch splits over (data, fsdp,
expert) and heads over tensor by the rules table (layers/sharding.py); heads stay whole when q's
and kv's heads would not split the same way (the grouped-query map would break).

Smaller things the mixers gather instead of whole arrays: per-block summaries (`gather_natural` of
[B, T / b, ...]) and a few rows of the sequence (`natural_rows`, a psum of [B, rows, ...]).
Not done: gathering only the selected key blocks (each device would fetch a data-dependent set
from the others); every device receives all of K and V.
"""

from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from hybrax.layers.sequence_parallel import layout
from hybrax.layers.sharding import spec


def check_chunks(seq_len: int, num_devices: int, block: int, name: str = "block_size") -> None:
    """One-line ValueError unless T splits into 2P zigzag chunks of a whole number of blocks."""
    layout.check_length(seq_len, num_devices)
    chunk = seq_len // (2 * num_devices)
    if chunk % block:
        raise ValueError(f"zigzag chunk length {chunk} (T={seq_len} in 2 * seq={2 * num_devices} chunks) must be a "
                         f"multiple of {name}={block}")


def gather_natural(x_local: jax.Array, num_devices: int, axis: int = 1) -> jax.Array:
    """Inside shard_map: the whole of `x` along `axis` from every device on seq, in natural order.
    Works for anything cut like the tokens, e.g. per-block summaries [B, T / b, ...]."""
    stored = jax.lax.all_gather(x_local, layout.SEQ_AXIS, axis=axis, tiled=True)
    return layout.from_zigzag(stored, num_devices, axis=axis)


def natural_rows(x_local: jax.Array, first: int, count: int, num_devices: int) -> jax.Array:
    """Inside shard_map: rows [first, first + count) of the natural sequence (axis 1), from the
    devices that hold them: each scatters its rows into [B, count, ...] and a psum over seq adds the
    pieces (exact: every row comes from one device). Moves count rows, not the sequence."""
    offset_T = layout.local_positions(x_local.shape[1], num_devices) - first
    slot_T = jnp.where((offset_T >= 0) & (offset_T < count), offset_T, count)
    rows = jnp.zeros((x_local.shape[0], count, *x_local.shape[2:]), x_local.dtype)
    return jax.lax.psum(rows.at[:, slot_T].set(x_local, mode="drop"), layout.SEQ_AXIS)


def local_query_blocks(local_len: int, block: int, num_devices: int) -> jax.Array:
    """Inside shard_map: int32 [local_len / block], the natural block index of each local block."""
    return layout.local_positions(local_len, num_devices)[::block] // block


def offset_implementation(implementation: str | Sequence[str] | None):
    """The block_sparse_attention choice for queries at a block offset: a forced Pallas kernel does
    not take them, so xla follows it in the list (the switch falls through)."""
    if implementation is None or implementation in ("xla", "reference"):
        return implementation
    names = [implementation] if isinstance(implementation, str) else list(implementation)
    return names + ["xla"] * ("xla" not in names)


def _specs(q_shape, kv_shape) -> dict[str, object]:
    """Mesh axes by logical name for this call: batch and length from q; heads from q and kv
    together (whole when they would split differently)."""
    q_spec = spec(("batch", "length", "heads", None), q_shape)
    kv_spec = spec(("batch", "length", "kv_heads", None), kv_shape)
    heads, kv_heads = (q_spec[2], kv_spec[2]) if q_spec[2] == kv_spec[2] else (None, None)
    return {"batch": q_spec[0], "length": q_spec[1], "heads": heads, "kv_heads": kv_heads}


def attend_with_gathered_keys(core: Callable, q: jax.Array, k: jax.Array, v: jax.Array, segment_ids=None, *,
                              block: int, extras: Mapping[str, tuple] = {}) -> jax.Array:
    """Run `core` on this device's queries against all keys, in shard_map over the current mesh.

    q [B, T, H, D], k, v [B, T, Hkv, D], segment_ids [B, T] or None: global arrays in stored order.
    extras: name -> (array, logical names) passed to core as keyword arguments, split by the same
    rule (e.g. ("batch", "length", "heads", None) for per-token gates, (None, "kv_heads", None) for
    per-head weights; names outside the table stay whole).

        core(q [B', T/P, H', D], k, v [B', T, Hkv', D] natural, q_segment_ids [B', T/P] | None,
             kv_segment_ids [B', T] | None natural, query_block_Q int32 [T / (P b)], head_axes,
             **extras) -> o [B', T/P, H', D]

    head_axes: the mesh axes the heads are split over (None: all heads are local), for a reduction
    over heads. Returns o [B, T, H, D] in stored order."""
    num_devices = layout.seq_size()
    check_chunks(q.shape[1], num_devices, block)
    axes = _specs(q.shape, k.shape)
    to_spec = lambda names: P(*(axes.get(name) for name in names))  # noqa: E731
    q_spec, kv_spec = to_spec(("batch", "length", "heads", None)), to_spec(("batch", "length", "kv_heads", None))
    arrays = {"q": q, "k": k, "v": v, "segment_ids": segment_ids, **{n: a for n, (a, _) in extras.items()}}
    specs = {"q": q_spec, "k": kv_spec, "v": kv_spec, "segment_ids": to_spec(("batch", "length")),
             **{n: to_spec(names) for n, (_, names) in extras.items()}}
    present = [n for n, a in arrays.items() if a is not None]

    def local(given):
        q, k, v, segment_ids = (given.get(n) for n in ("q", "k", "v", "segment_ids"))
        kv_segment_ids = None if segment_ids is None else gather_natural(segment_ids, num_devices)
        query_block_Q = local_query_blocks(q.shape[1], block, num_devices)
        return core(q, gather_natural(k, num_devices), gather_natural(v, num_devices), segment_ids, kv_segment_ids,
                    query_block_Q, axes["heads"], **{n: given[n] for n in extras if n in given})

    # check_vma=False as in the other sequence-parallel maps: the ops' own scans start from
    # replicated zeros (block_sparse_attention's xla backward over many key chunks)
    return jax.shard_map(local, in_specs=({n: specs[n] for n in present},), out_specs=q_spec, check_vma=False)(
        {n: arrays[n] for n in present})
