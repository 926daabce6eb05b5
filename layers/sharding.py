"""The one table from logical axis names to mesh axes, and the helpers that apply it.

Parameters name their dimensions (`layers.parameters.logical_param`); activations are constrained
by names (`constrain`); the sequence-parallel mixers build their `jax.shard_map` specs from names
(`spec`). All of them go through `RULES`:

    batch -> (data, fsdp, expert)   length -> seq        embed (parameters) -> fsdp
    heads, kv_heads, mlp, vocab -> tensor                 experts -> expert
    everything else (head_dim, low_rank, conv, act_embed, ...) -> not sharded

Mesh axes missing from the current mesh (or of size 1) are skipped, so one table serves every mesh shape and no
mesh at all (a notebook): `constrain` is then the identity. A dimension that the mesh axes do not
divide stays whole on the trailing axes that do not fit (e.g. 3 heads over tensor=2 are
replicated), so small layers never fail to shard. Two names of one array that land on the same
mesh axis are refused with a one-line error: one mesh axis cannot split two dimensions.
"""

from collections.abc import Sequence

import jax
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "seq", "expert")

RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp", "expert"),
    "length": ("seq",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
    "experts": ("expert",),
}


def current_mesh():
    """The abstract mesh set by `jax.set_mesh`, or None outside one."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty else mesh


def axis_size(name: str) -> int:
    """Size of mesh axis `name` in the current mesh (1 without a mesh or without that axis)."""
    mesh = current_mesh()
    return mesh.shape[name] if mesh is not None and name in mesh.axis_names else 1


def spec(names: Sequence[str | None], shape: Sequence[int] | None = None, mesh=None, rules=None) -> P:
    """PartitionSpec for an array whose dimensions are named `names` (None: not sharded).

    With `shape`, trailing mesh axes of a dimension that they do not divide are dropped."""
    mesh = current_mesh() if mesh is None else mesh
    rules = RULES if rules is None else rules
    if mesh is None:
        return P(*([None] * len(names)))
    used: dict[str, str] = {}
    entries = []
    for dim, name in enumerate(names):
        axes = [a for a in rules.get(name, ()) if name is not None and a in mesh.axis_names and mesh.shape[a] > 1]
        if shape is not None:
            while axes and shape[dim] % _product(mesh, axes):
                axes.pop()
        for a in axes:
            if a in used:
                raise ValueError(f"logical axes {used[a]!r} and {name!r} of one array both map to mesh axis {a!r}; "
                                 f"one mesh axis can split only one dimension (names {tuple(names)})")
            used[a] = name
        entries.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return P(*entries)


def _product(mesh, axes) -> int:
    size = 1
    for a in axes:
        size *= mesh.shape[a]
    return size


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names under the current mesh; identity without one."""
    if current_mesh() is None:
        return x
    return jax.lax.with_sharding_constraint(x, spec(names, x.shape))
