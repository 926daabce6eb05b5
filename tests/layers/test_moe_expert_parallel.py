"""Expert parallelism on 8 fake CPU devices: the MoE layer under a mesh with an `expert` axis gives
the single-device output, auxiliary losses and gradients (fp32, relative error <= 1e-5), dropless
and capacity. The
ragged exchange (ragged_all_to_all, which XLA:CPU lacks) is compiled for a 4-chip TPU topology."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hybrax.layers.moe import MoE, MoEConfig

from devices import run_with_devices

CHECK = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from hybrax.layers.auxiliary import forward_with_auxiliaries
from hybrax.layers.moe import MoE, MoEConfig

def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))

results = {}
x = jax.random.normal(jax.random.key(1), (8, 12, 32), jnp.float32)
cot = jax.random.normal(jax.random.key(2), x.shape, jnp.float32)
for dispatch in ("dropless", "capacity"):
    config = MoEConfig(d_model=32, num_experts=8, top_k=2, expert_hidden=16, num_shared_experts=1,
                       dispatch=dispatch, capacity_factor=1.0, balance_loss_weight=0.1, z_loss_weight=0.01)
    moe = MoE(config, rngs=nnx.Rngs(0))
    moe.train()   # the balance and z losses (over all data shards' tokens) join the objective
    moe.expert_bias[...] = jnp.linspace(0.0, 0.05, 8)    # uneven load (capacity mode drops)
    graphdef, params, rest = nnx.split(moe, nnx.Param, ...)

    def loss(params, x):
        y, losses, _ = forward_with_auxiliaries(nnx.merge(graphdef, params, rest, copy=True), x)
        return jnp.sum(y * cot) + 100.0 * sum(losses.values())

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    single = step(params, x)
    for shape in ((1, 8), (2, 4)):
        mesh = jax.make_mesh(shape, ("data", "expert"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
        with jax.set_mesh(mesh):
            text = step.lower(params, x).as_text()
            sharded = step(params, x)
        errors = [rel(a, b) for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single))]
        results[f"{dispatch} data={shape[0]} expert={shape[1]}"] = {
            "max_rel_error": max(errors), "all_to_all": text.count("all_to_all")}
mesh = jax.make_mesh((8,), ("expert",), axis_types=(jax.sharding.AxisType.Auto,))
too_few = MoE(MoEConfig(d_model=32, num_experts=4, top_k=2, expert_hidden=16), rngs=nnx.Rngs(0))
with jax.set_mesh(mesh):
    try:
        too_few(x)
        results["error"] = None
    except ValueError as e:
        results["error"] = str(e)
print(json.dumps(results))
"""


@pytest.mark.slow
@pytest.mark.multi_device
def test_expert_parallel_equals_single_device():
    results = run_with_devices(CHECK, devices=8)
    assert results.pop("error") == "num_experts=4 must be a multiple of the mesh axis expert=8"
    assert len(results) == 4
    for name, r in results.items():
        assert r["max_rel_error"] <= 1e-5, (name, r)
        assert r["all_to_all"] >= 2, (name, r)   # tokens really travel


@pytest.mark.slow
@pytest.mark.tpu_compile
@pytest.mark.parametrize("exchange", ["padded", "ragged"])
def test_expert_parallel_compiles_for_a_tpu_topology(exchange):
    """Forward and backward of the expert-parallel layer compile for v5e:2x2 (experts over 4 chips),
    and the ragged exchange really lowers to ragged-all-to-all."""
    pytest.importorskip("libtpu", reason="libtpu not installed (pip install -e '.[test]')")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other jax processes may hold the lock
    from jax.experimental import topologies
    mesh = Mesh(np.array(topologies.get_topology_desc("v5e:2x2", "tpu").devices).reshape(4), ("expert",))
    config = MoEConfig(d_model=256, num_experts=8, top_k=2, expert_hidden=256, exchange=exchange, dtype="bfloat16")
    graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: MoE(config, rngs=nnx.Rngs(0))), nnx.Param, ...)
    replicated = NamedSharding(mesh, P())
    abstract = lambda tree: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), tree)
    x = jax.ShapeDtypeStruct((8, 128, 256), jnp.float32, sharding=NamedSharding(mesh, P("expert")))

    def loss(params, x, rest):
        return jnp.sum(nnx.merge(graphdef, params, rest)(x).astype(jnp.float32))

    with jax.set_mesh(mesh):
        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(abstract(params), x, abstract(rest)).compile()
    text = compiled.as_text()
    assert ("ragged-all-to-all" in text) == (exchange == "ragged")
    assert "all-to-all" in text
