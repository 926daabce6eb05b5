"""Kernel calls partitioned over the mesh (layers/partitioned.py).

- which mesh axes split which logical names: heads and kv_heads alike or not at all, dimensions
  the axes do not divide left whole, manual axes (inside another shard_map) left alone;
- on 8 fake CPU devices, each partitioned op (linear attention with per-channel gates and packed
  segments, block-sparse and dense attention with grouped queries, the MoE dropless dispatch with
  its hidden width split over tensor) gives the unpartitioned outputs and gradients, and its
  jitted program holds a shard_map around the op;
- the Pallas kernels themselves, forced and interpreted, run inside that shard_map.
"""

import pathlib
import sys

import pytest
from jax.sharding import AbstractMesh, AxisType

from hybrax.layers.partitioned import free_axes, split_axes

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from devices import run_with_devices  # noqa: E402


class _Shape:
    def __init__(self, *shape):
        self.shape = shape


def _mesh(manual=(), **sizes):
    names = ("data", "fsdp", "tensor", "seq", "expert")
    types = tuple(AxisType.Manual if a in manual else AxisType.Auto for a in names)
    return AbstractMesh(tuple(sizes.get(a, 1) for a in names), names, axis_types=types)


def test_heads_and_kv_heads_split_alike_or_not_at_all():
    mesh = _mesh(data=2, tensor=2)
    free = free_axes(mesh)
    q, kv = _Shape(4, 16, 4, 8), _Shape(4, 16, 2, 8)
    names = [("batch", None, "heads", None), ("batch", None, "kv_heads", None)]
    assert split_axes(mesh, free, [q, kv], names) == {"batch": ("data",), "heads": ("tensor",),
                                                      "kv_heads": ("tensor",)}
    one_kv_head = _Shape(4, 16, 1, 8)   # 1 key/value head cannot split over tensor=2: neither can the queries
    assert split_axes(mesh, free, [q, one_kv_head], names)["heads"] == ()


def test_undivided_rows_stay_whole_and_manual_axes_are_left_alone():
    mesh = _mesh(data=2, fsdp=2)
    rows = [("batch", None)]
    assert split_axes(mesh, free_axes(mesh), [_Shape(4, 8)], rows) == {"batch": ("data", "fsdp")}
    assert split_axes(mesh, free_axes(mesh), [_Shape(2, 8)], rows) == {"batch": ("data",)}
    assert split_axes(mesh, free_axes(mesh), [_Shape(1, 8)], rows) == {"batch": ()}
    inside = _mesh(manual=("data",), data=2, fsdp=2)
    assert free_axes(inside) == ("fsdp",)
    assert split_axes(inside, free_axes(inside), [_Shape(4, 8)], rows) == {"batch": ("fsdp",)}


_EQUALS_UNPARTITIONED = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from hybrax.layers import partitioned
from hybrax.layers.moe.dropless import dropless

B, T, H, G, D = 4, 40, 4, 2, 16
keys = jax.random.split(jax.random.PRNGKey(0), 8)
q = jax.random.normal(keys[0], (B, T, H, D))
k = jax.random.normal(keys[1], (B, T, G, D))
v = jax.random.normal(keys[2], (B, T, G, D))
gates = -jax.nn.softplus(jax.random.normal(keys[3], (B, T, H, D)))
segment_ids = jnp.asarray(np.repeat(np.arange(4), 10)[None].repeat(B, 0), jnp.int32)
blocks = jnp.broadcast_to(jnp.asarray([[0, -1], [0, 1], [1, 2], [2, 3], [3, 4]], jnp.int32), (B, H, 5, 2))
E, F, K = 4, 32, 2
x_rows = jax.random.normal(keys[4], (B * T, D))
experts = jax.random.randint(keys[5], (B * T, K), 0, E)
weights = jax.nn.softmax(jax.random.normal(keys[6], (B * T, K)), axis=-1)
w_gate, w_up = jax.random.normal(keys[7], (2, E, D, F)) * 0.2
w_down = jax.random.normal(keys[0], (E, F, D)) * 0.2

def ops(impl):
    return {
        "linear_attention": lambda q, k, v: partitioned.linear_attention(
            q, q, jnp.repeat(v, H // G, 2), gates, scale=0.25, segment_ids=segment_ids, chunk_size=16,
            implementation=impl["linear"])[0],
        "block_sparse_attention": lambda q, k, v: partitioned.block_sparse_attention(
            q, k, v, blocks, block_size=(8, 8), scale=0.25, segment_ids=segment_ids, implementation=impl["sparse"]),
        "dot_product_attention": lambda q, k, v: partitioned.dot_product_attention(
            q, k, v, causal=True, scale=0.25, segment_ids=segment_ids, implementation="xla"),
        "moe_dropless": lambda q, k, v: dropless(
            x_rows * jnp.mean(q), experts, weights, w_gate, w_up, w_down, dtype="float32",
            implementation=impl["grouped"]).reshape(B, T, D),
    }

def value_and_grads(fn, q, k, v):
    loss = lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)

def rel(a, b):
    return float(jnp.linalg.norm((a - b).ravel()) / (jnp.linalg.norm(b.ravel()) + 1e-30))

out = {}
for kernels in ("xla", "pallas"):
    impl = ({"linear": "xla", "sparse": "xla", "grouped": "xla"} if kernels == "xla" else
            {"linear": "pallas_gpu", "sparse": "pallas_tpu", "grouped": "xla"})
    for name, fn in ops(impl).items():
        if kernels == "pallas" and name in ("dot_product_attention", "moe_dropless"):
            continue
        want = value_and_grads(fn, q, k, v)
        for mesh_shape in ((2, 2, 2, 1, 1),):
            mesh = jax.make_mesh(mesh_shape, ("data", "fsdp", "tensor", "seq", "expert"),
                                 axis_types=(AxisType.Auto,) * 5)
            with jax.set_mesh(mesh):
                rows = NamedSharding(mesh, P(("data", "fsdp")))
                args = [jax.device_put(a, rows) for a in (q, k, v)]
                got = value_and_grads(fn, *args)
                program = str(jax.make_jaxpr(fn)(*args))
            errors = [rel(got[0], want[0])] + [rel(a, b) for a, b in zip(got[1], want[1])]
            out[f"{kernels}/{name}/{mesh_shape}"] = {"error": max(errors), "shard_map": "shard_map" in program}
print(json.dumps(out))
"""


@pytest.mark.slow   # 19 s; the conformance suite's sharded check and test_sharding keep a fast one
def test_partitioned_ops_equal_unpartitioned_on_8_devices():
    results = run_with_devices(_EQUALS_UNPARTITIONED, devices=8)
    print({case: f"{r['error']:.1e}" for case, r in results.items()})
    assert len(results) == 6, sorted(results)
    for case, result in results.items():
        assert result["shard_map"], case
        # float32 sums in another order: per-device blocks (kernels' dk, dv accumulation), the MoE
        # hidden sum split over tensor and reduced by a psum
        assert result["error"] <= 3e-5, (case, result)
