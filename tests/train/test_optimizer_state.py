"""The memory-efficient optimizers' state in a run: sharded like the parameters under fsdp (each
device holds about a quarter at fsdp=4, and a sharded update equals the single-device one), and
saved compressed and resumed to the last bit (a run stopped by SIGTERM and resumed takes the same
losses as an uninterrupted one)."""

import pathlib
import signal
import subprocess
import sys

import pytest
from trainer_cli import ROOT, command, metrics, run, train_losses, wait_for_step

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "layers"))
from devices import run_with_devices  # noqa: E402  (tests/layers/devices.py)

OPTIMIZERS = ("adamw", "adamw8bit", "galore", "natural_galore", "frugal")

SHARDED = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from hybrax.train.config import load_config
from hybrax.train.optim import device_state_bytes, make_optimizer, state_bytes
from hybrax.train.sharding import create_sharded, make_mesh, state_shardings
from hybrax.train.step import abstract_state, create_model, init_state

results = {}
for name in [NAME]:
    config = load_config("configs/quickstart.yaml", [f"optim.name={name}", "mesh.data=2", "mesh.fsdp=4",
                                                     "optim.galore.update_interval=1",
                                                     "optim.frugal.update_interval=1"])
    optimizer = make_optimizer(config.optim, 10)
    graphdef, abstract = abstract_state(config.model, optimizer)
    build = lambda: init_state(create_model(config.model, 0), optimizer)[1]
    single = jax.jit(build)()
    grads = jax.tree.map(lambda p: 0.01 * jnp.cos(jnp.arange(p.size, dtype=jnp.float32).reshape(p.shape)),
                         single.params)
    update = jax.jit(optimizer.update)
    want, want_state = update(grads, single.opt_state, single.params)
    mesh = make_mesh(config.mesh)
    with jax.set_mesh(mesh):
        shardings = state_shardings(abstract, mesh)
        state = create_sharded(build, shardings)
        sharded_update = jax.jit(optimizer.update, out_shardings=(shardings.params, shardings.opt_state))
        got, got_state = sharded_update(grads, state.opt_state, state.params)
    error = max(float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / max(np.linalg.norm(np.asarray(b)), 1e-30))
                for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
    results[name] = {"total": state_bytes(state.opt_state), "device": device_state_bytes(state.opt_state),
                     "after_update_device": device_state_bytes(got_state), "update_error": error}
print(json.dumps(results))
"""


@pytest.mark.slow   # 8 devices in a subprocess; tests/train/test_optimizers.py checks the names fast
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fsdp_shards_the_optimizer_state_like_the_parameters(name):
    results = run_with_devices(f"NAME = {name!r}\n" + SHARDED)
    for name, r in results.items():
        print(f"{name}: {r['total']:,} bytes in all, {r['device']:,} on device 0 ({r['device'] / r['total']:.4f}); "
              f"sharded update error {r['update_error']:.1e}")
        assert r["device"] / r["total"] < 0.26, (name, r)           # fsdp=4: a quarter, plus replicated scraps
        assert r["after_update_device"] == r["device"], (name, r)   # the update keeps the layout
        assert r["update_error"] < 1e-4, (name, r)


STEPS = ["train.steps=8", "checkpoint.every=100", "log.sample_tokens=0", "log.tensorboard=false",
         "optim.galore.update_interval=3", "optim.natural_galore.update_interval=3", "optim.frugal.update_interval=3"]


@pytest.mark.slow   # three trainer runs each; the fast suite's resume-to-the-bit tests cover the loop with AdamW
@pytest.mark.parametrize("name", [n for n in OPTIMIZERS if n != "adamw"])
def test_a_stopped_run_resumes_the_compressed_state_exactly(tmp_path, name):
    overrides = [*STEPS, f"optim.name={name}"]
    straight = run(tmp_path / "straight", *overrides)
    assert straight.returncode == 0, straight.stderr[-2000:]
    assert f"optimizer {name}: state" in straight.stdout
    stopped = tmp_path / "stopped"
    proc = subprocess.Popen(command(stopped, *overrides), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    wait_for_step(proc, stopped, 3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    resumed = run(stopped, *overrides)
    assert resumed.returncode == 0 and "resumed from checkpoint at step" in resumed.stdout, resumed.stderr[-2000:]
    assert max(train_losses(metrics(stopped))) == 8
    assert train_losses(metrics(stopped)) == train_losses(metrics(tmp_path / "straight"))   # to the last bit
