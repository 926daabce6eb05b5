"""Expert parallelism on 8 fake CPU devices: the MoE layer under a mesh with an `expert` axis gives
the single-device output and gradients (fp32, relative error <= 1e-5), dropless and capacity."""

import pytest

from devices import run_with_devices

CHECK = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from layers.moe import MoE, MoEConfig

def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))

results = {}
x = jax.random.normal(jax.random.key(1), (8, 12, 32), jnp.float32)
cot = jax.random.normal(jax.random.key(2), x.shape, jnp.float32)
for dispatch in ("dropless", "capacity"):
    config = MoEConfig(d_model=32, num_experts=8, top_k=2, expert_hidden=16, num_shared_experts=1,
                       dispatch=dispatch, capacity_factor=1.0)
    moe = MoE(config, rngs=nnx.Rngs(0))
    moe.expert_bias[...] = jnp.linspace(0.0, 0.05, 8)    # uneven load (capacity mode drops)
    graphdef, params, rest = nnx.split(moe, nnx.Param, ...)

    def loss(params, x):
        return jnp.sum(nnx.merge(graphdef, params, rest)(x) * cot)

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
print(json.dumps(results))
"""


@pytest.mark.multi_device
def test_expert_parallel_equals_single_device():
    results = run_with_devices(CHECK, devices=8)
    assert len(results) == 4
    for name, r in results.items():
        assert r["max_rel_error"] <= 1e-5, (name, r)
        assert r["all_to_all"] >= 2, (name, r)   # tokens really travel
