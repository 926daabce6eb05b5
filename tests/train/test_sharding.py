"""Sharded training on 8 fake CPU devices equals training on one.

- the rules table: names to mesh axes, axes missing from the mesh skipped, dimensions the mesh
  does not divide left whole, two names on one mesh axis refused;
- the train state is created sharded (each device's output of the init is its shard only) and a
  checkpoint saved from one mesh restores onto another with the same values;
- for each mixer family, the loss, every gradient and the new model state of one train step on
  the meshes data=2 x seq=4 and data=2 x seq=2 x tensor=2 (and seq=2 x expert=4 for MoE and MoMa; batches
  in zigzag order) equal the single-device ones: relative error <= 1e-5 in float32.
"""

import pathlib
import sys

import pytest
from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P

from hybrax.layers.sharding import MESH_AXES, spec

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "layers"))
from devices import run_with_devices  # noqa: E402  (tests/layers/devices.py)


def _mesh(**sizes):
    shape = tuple(sizes.get(a, 1) for a in MESH_AXES)
    return AbstractMesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def test_rules_table_maps_names_to_mesh_axes():
    mesh = _mesh(data=2, fsdp=2, tensor=2)
    assert spec(("embed", "heads", "head_dim"), (64, 4, 16), mesh) == P("fsdp", "tensor", None)
    assert spec(("batch", "length", "act_embed"), (8, 32, 64), mesh) == P(("data", "fsdp"), None, None)
    assert spec(("experts", "embed", "mlp"), (8, 64, 32), _mesh(expert=4, fsdp=2)) == P("expert", "fsdp", None)


def test_dimensions_the_mesh_does_not_divide_stay_whole():
    mesh = _mesh(data=2, fsdp=2, tensor=2)
    assert spec(("embed", "heads", "head_dim"), (64, 3, 16), mesh) == P("fsdp", None, None)
    assert spec(("batch", "length"), (2, 32), mesh) == P("data", None)   # 2 rows: data only


def test_two_names_on_one_mesh_axis_are_refused():
    rules = {"embed": ("fsdp",), "mlp": ("fsdp",)}
    with pytest.raises(ValueError, match="logical axes 'embed' and 'mlp' of one array both map to mesh axis 'fsdp'"):
        spec(("embed", "mlp"), (64, 128), _mesh(fsdp=2), rules=rules)


COMMON = r"""
import json, tempfile
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from hybrax.train.config import load_config, CheckpointConfig
from hybrax.train.data import build_datasets
from hybrax.train.optim import make_optimizer
from hybrax.train.sharding import make_mesh, state_shardings, create_sharded, shard_batch, with_shardings
from hybrax.train.step import abstract_state, init_state, create_model, accumulate_gradients
from hybrax.train.checkpoint import Checkpointer

def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))

def setup(overrides, mesh_overrides):
    config = load_config("configs/quickstart.yaml", ["model.dtype=float32", *overrides, *mesh_overrides])
    optimizer = make_optimizer(config.optim, 10)
    graphdef, abstract = abstract_state(config.model, optimizer)
    return config, optimizer, graphdef, abstract
"""

INIT_AND_CHECKPOINT = COMMON + r"""
overrides = ["model.d_model=64", "model.num_layers=2", "model.num_heads=4", "data.seq_len=32", "data.batch_size=8"]
config, optimizer, graphdef, abstract = setup(overrides, ["mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2"])
build = lambda: init_state(create_model(config.model, 0), optimizer)[1]
single = jax.jit(build)()
mesh = make_mesh(config.mesh)
results = {}
with jax.set_mesh(mesh):
    shardings = state_shardings(abstract, mesh)
    state = create_sharded(build, shardings)
    w_q = state.params["blocks"][0]["mixer"]["w_q"][...]
    results["w_q_spec"] = str(tuple(w_q.sharding.spec))
    results["w_q_shard_shape"] = list(w_q.addressable_shards[0].data.shape)
    out_bytes = jax.jit(build, out_shardings=shardings).lower().compile().memory_analysis().output_size_in_bytes
    results["init_output_fraction"] = out_bytes / sum(x.nbytes for x in jax.tree.leaves(single))
    results["init_equal"] = max(rel(a, b) for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(single)))
    folder = tempfile.mkdtemp()
    ckpt = Checkpointer(folder, CheckpointConfig(async_save=False))
    ckpt.save(1, state, {"position": 3}, wait=True)
    ckpt.close()
other = make_mesh(load_config("configs/quickstart.yaml", ["mesh.data=8"]).mesh)
with jax.set_mesh(other):
    target = with_shardings(abstract, state_shardings(abstract, other))
    ckpt = Checkpointer(folder, CheckpointConfig(async_save=False))
    restored, data_state = ckpt.restore(1, target)
    ckpt.close()
    w_q = restored.params["blocks"][0]["mixer"]["w_q"][...]
    results["restored_spec"] = str(tuple(w_q.sharding.spec))
    results["restored_mesh"] = dict(w_q.sharding.mesh.shape)
    results["restored_equal"] = max(rel(a, b) for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(single)))
    results["data_state"] = data_state
print(json.dumps(results))
"""


def test_state_is_born_sharded_and_restores_onto_another_mesh():
    r = run_with_devices(INIT_AND_CHECKPOINT)
    assert r["w_q_spec"] == "('fsdp', 'tensor', None)"
    assert r["w_q_shard_shape"] == [16, 2, 16]             # [64, 4, 16] over fsdp=4, tensor=2
    assert r["init_output_fraction"] < 0.25                # each device makes about 1/8 of the state
    assert r["init_equal"] == 0.0                          # same values as the unsharded init
    assert r["restored_spec"] in ("(None, None, None)", "()") and r["restored_mesh"]["data"] == 8
    assert r["restored_equal"] == 0.0
    assert r["data_state"] == {"position": 3}


STEP = COMMON + r"""
import sys
family = sys.argv[1] if len(sys.argv) > 1 else FAMILY
blocks = [f"model.{name}.block_size=8" for name in ("moba", "nsa", "bilevel_routing_attention", "routing_attention")]
overrides = ["model.d_model=64", "model.num_layers=2", "model.num_heads=4", "data.seq_len=128", "data.batch_size=4",
             *blocks, "model.nsa.window=16"] + FAMILIES[family]
config, optimizer, graphdef, abstract = setup(overrides, [])
numpy_batch = next(build_datasets(config.data, 0).train)
build = lambda: init_state(create_model(config.model, 0), optimizer)[1]
state = jax.jit(build)()
step = jax.jit(lambda params, model_state, batch: accumulate_gradients(graphdef, params, model_state, batch, 1))
grads, loss, count, reported, model_state = step(state.params, state.model_state, numpy_batch)
results = {}
meshes = [["mesh.data=2", "mesh.seq=4"], ["mesh.data=2", "mesh.seq=2", "mesh.tensor=2"]]
if family in ("moe", "moma"):   # experts split over `expert` too (expert parallelism)
    meshes.append(["mesh.data=1", "mesh.seq=2", "mesh.expert=4"])
for mesh_overrides in meshes:
    config = load_config("configs/quickstart.yaml", [*overrides, *mesh_overrides])
    mesh = make_mesh(config.mesh)
    with jax.set_mesh(mesh):
        sharded_state = create_sharded(build, state_shardings(abstract, mesh))
        batch = shard_batch(numpy_batch, mesh)
        g, l, c, rep, ms = step(sharded_state.params, sharded_state.model_state, batch)
    errors = {"loss": rel(l, loss), "grads": max(rel(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(grads)))}
    if jax.tree.leaves(model_state):
        errors["model_state"] = max(rel(a, b) for a, b in zip(jax.tree.leaves(ms), jax.tree.leaves(model_state)))
    results[" ".join(mesh_overrides)] = errors
print(json.dumps(results))
"""

FAMILIES = {
    "attention": ["model.mixers=[attention]"],
    "linear_attention": ["model.mixers=[linear_attention]"],
    "gla": ["model.mixers=[gla]"],
    "mamba2": ["model.mixers=[mamba2]", "model.d_model=64"],
    "moba": ["model.mixers=[moba]"],
    "nsa": ["model.mixers=[nsa]"],
    "bilevel_routing_attention": ["model.mixers=[bilevel_routing_attention]"],
    "routing_attention": ["model.mixers=[routing_attention]"],
    "moe": ["model.mixers=[gla, attention]", "model.ffns=[moe]", "model.moe.num_experts=4"],
    # modality ids from the plays' markup, sharded with the tokens (expert choice within each modality)
    "moma": ["model.ffns=[swiglu, moma]", "model.moma.experts_per_modality=[2,2]", "data.modalities=script"],
}
FAST = ("gla",)   # the others run with `make test-slow` (each family also has its layer-level test)


@pytest.mark.parametrize("family", [pytest.param(f, marks=() if f in FAST else pytest.mark.slow) for f in FAMILIES])
def test_one_sharded_step_equals_one_device(family):
    code = f"FAMILIES = {FAMILIES!r}\nFAMILY = {family!r}\n" + STEP
    results = run_with_devices(code)
    for mesh, errors in results.items():
        for what, error in errors.items():
            assert error <= 1e-5, f"{family} on {mesh}: {what} relative error {error:.2e}"
