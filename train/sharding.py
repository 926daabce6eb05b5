"""From the `mesh` config to sharded train states and batches.

    mesh = make_mesh(config.mesh)                          # axes data, fsdp, tensor, seq, expert
    shardings = state_shardings(abstract, mesh)            # from each parameter's logical names
    state = create_sharded(lambda: init(...), shardings)   # born sharded: no full copy anywhere
    batch = shard_batch(numpy_batch, mesh)                 # zigzag order over seq, split by rows

The logical-to-mesh table lives in `layers.sharding.RULES` (layers need it for their own
constraints and `shard_map` specs); this module applies it to whole train states. Variables with
logical names (`nnx.Param` and the optimiser moments that mirror them) are split by the table;
everything else (step counters, routing state) is replicated.

Multi-host: each process packs only the rows of every global batch that its devices hold
(`process_rows`; the packer's row order is deterministic, so the processes agree without talking)
and hands JAX only its devices' blocks (`jax.make_array_from_callback`); nothing crosses hosts
for data. Validation batches are small: every process packs them whole and places its blocks.
"""

from collections.abc import Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from hybrax.layers.sequence_parallel.layout import check_length, to_zigzag
from hybrax.layers.sharding import MESH_AXES, spec
from hybrax.train.config import MeshConfig

BATCH_NAMES = ("batch", "length")


def make_mesh(config: MeshConfig, devices=None) -> Mesh:
    """A mesh with the five named axes (sizes from the config; one may be -1), Auto axis types
    (XLA propagates shardings; the mixers take over with `shard_map` where they need to)."""
    devices = jax.devices() if devices is None else devices
    shape = config.shape(len(devices))
    return jax.make_mesh(tuple(shape[a] for a in MESH_AXES), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _leaf_sharding(mesh: Mesh, leaf) -> NamedSharding:
    if isinstance(leaf, nnx.Variable):
        names = leaf.get_metadata().get("out_sharding")
        value = leaf.get_value() if hasattr(leaf, "get_value") else leaf.value
        if names is not None:
            return NamedSharding(mesh, spec(names, value.shape, mesh))
    return NamedSharding(mesh, P())


def state_shardings(abstract_state, mesh: Mesh):
    """A tree like `abstract_state` holding a NamedSharding per array (Variables map to the
    sharding of their value)."""
    def one(leaf):
        sharding = _leaf_sharding(mesh, leaf)
        return leaf.replace(sharding) if isinstance(leaf, nnx.Variable) else sharding
    return jax.tree.map(one, abstract_state, is_leaf=_is_variable)


def with_shardings(abstract_state, shardings):
    """`abstract_state` (ShapeDtypeStructs) with each leaf's sharding set: the restore target."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)


def create_sharded(build: Callable, shardings):
    """Run `build()` (which returns a tree shaped like `shardings`) under jit with those output
    shardings: every array is created in place on its devices."""
    return jax.jit(build, out_shardings=shardings)()


def batch_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    return NamedSharding(mesh, spec(BATCH_NAMES, shape, mesh))


def check_batch(mesh: Mesh, batch_size: int, seq_len: int) -> None:
    """The rows must split over the batch axes and the length over seq (in zigzag chunks)."""
    rows = spec(("batch",), None, mesh)[0] or ()
    rows = (rows,) if isinstance(rows, str) else rows
    shards = int(np.prod([mesh.shape[a] for a in rows])) if rows else 1
    if batch_size % shards:
        raise ValueError(f"batch of {batch_size} rows is not divisible by the {shards} devices over mesh axes "
                         f"{rows} that split the batch")
    check_length(seq_len, mesh.shape["seq"])


def process_rows(mesh: Mesh, batch_size: int, seq_len: int) -> tuple[int, int]:
    """The rows [start, stop) of a global [B, T] batch that this process's devices hold (all rows
    when they are not one contiguous range)."""
    index_map = batch_sharding(mesh, (batch_size, seq_len)).addressable_devices_indices_map((batch_size, seq_len))
    ranges = {index[0].indices(batch_size)[:2] for index in index_map.values()}
    start, stop = min(r[0] for r in ranges), max(r[1] for r in ranges)
    covered = set().union(*(range(*r) for r in ranges))
    return (start, stop) if covered == set(range(start, stop)) else (0, batch_size)


def shard_batch(batch: dict, mesh: Mesh, *, batch_size: int | None = None, row_start: int = 0) -> dict:
    """Numpy [b, T] arrays, rows row_start.. of a global batch of `batch_size` rows (default: the
    whole batch) -> global jax arrays in zigzag order over `seq`, rows over the batch axes; each
    process places only its devices' blocks, which must lie in the rows it has."""
    out = {}
    for key, value in batch.items():
        value = to_zigzag(np.asarray(value), mesh.shape["seq"], axis=1)
        shape = (batch_size or value.shape[0], *value.shape[1:])

        def block(index, v=value):
            rows = index[0].indices(shape[0])
            return v[(slice(rows[0] - row_start, rows[1] - row_start), *index[1:])]

        out[key] = jax.make_array_from_callback(shape, batch_sharding(mesh, shape), block)
    return out


def to_host(tree):
    """numpy values of (replicated or fully addressable) arrays, in single- and multi-process runs."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            x = x.addressable_data(0)
        return np.asarray(x)
    return jax.tree.map(one, tree)
