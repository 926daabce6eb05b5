"""Multi-process training through `jax.distributed`: two CPU processes with 4 devices each (gloo
collectives) train a hybrid GLA + attention model on a data=2 x seq=4 mesh and log the same
losses as one process on one device; a rerun of the two processes resumes from the checkpoint
they wrote together and continues on the one-device trajectory; SIGTERM on one process stops both
at the same step. Plus the one-line errors of incomplete multi-process settings."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from hybrax.train.distributed import DistributedConfigError, settings

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL = ["model.d_model=64", "model.num_layers=2", "model.num_heads=2", "model.mixers=[gla, attention]",
         "model.dtype=float32", "data.seq_len=64", "data.batch_size=8", "train.log_every=1", "train.eval_every=100",
         "train.eval_batches=1", "checkpoint.every=5", "log.progress_bar=false", "log.sample_tokens=8",
         "log.tensorboard=false"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _environment(devices: int) -> dict:
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}


def _train_losses(run_dir) -> dict[int, float]:
    records = [json.loads(line) for line in (pathlib.Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "tokens_per_s" in r}


def _two_processes(run_dir, *overrides) -> list[str]:
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "hybrax.train", "--config", "configs/quickstart.yaml", "--run-dir",
                               str(run_dir), "--coordinator", f"localhost:{port}", "--num-processes", "2",
                               "--process-id", str(i), *MODEL, "mesh.data=2", "mesh.seq=4", *overrides],
                              cwd=ROOT, env=_environment(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    return outputs


def _one_process(run_dir, *overrides) -> str:
    out = subprocess.run([sys.executable, "-m", "hybrax.train", "--config", "configs/quickstart.yaml", "--run-dir",
                          str(run_dir), *MODEL, "mesh.data=1", *overrides],
                         cwd=ROOT, env=_environment(1), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_two_processes_match_one_and_resume(tmp_path):
    """5 steps, then a rerun to 7 that resumes (the schedule follows train.steps, so the one-device
    reference makes the same two runs)."""
    _one_process(tmp_path / "single", "train.steps=5")
    _one_process(tmp_path / "single", "--resume", "train.steps=7")
    reference = _train_losses(tmp_path / "single")

    outputs = _two_processes(tmp_path / "multi", "train.steps=5")
    assert "(2 processes)" in outputs[0] and "(2 processes)" not in outputs[1]   # only process 0 logs
    first = _train_losses(tmp_path / "multi")
    assert sorted(first) == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([first[s] for s in range(1, 6)], [reference[s] for s in range(1, 6)], rtol=1e-5)
    assert (tmp_path / "multi" / "checkpoints" / "5").is_dir()

    outputs = _two_processes(tmp_path / "multi", "--resume", "train.steps=7")
    assert "resumed from checkpoint at step 5" in outputs[0]
    resumed = _train_losses(tmp_path / "multi")
    np.testing.assert_allclose([resumed[6], resumed[7]], [reference[6], reference[7]], rtol=1e-5)
    assert (tmp_path / "multi" / "samples.txt").read_text().strip()


@pytest.mark.slow
def test_two_processes_read_disjoint_rows_of_prepared_shards(tmp_path):
    """Token shards (hybrax-data prepare): each process reads only its rows of every global batch
    (train.packing row_range over train.shards), and together they train exactly as one process."""
    done = subprocess.run([sys.executable, "-m", "hybrax.train.prepare", "prepare", "--config", "quickstart.yaml",
                           "--out", str(tmp_path / "prepared"), "--shard-tokens", "1000000"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    shards = ["data.source=prepared", f"data.path={tmp_path / 'prepared'}", "train.steps=4"]
    _one_process(tmp_path / "single", *shards)
    _two_processes(tmp_path / "multi", *shards)
    single, multi = _train_losses(tmp_path / "single"), _train_losses(tmp_path / "multi")
    assert sorted(multi) == [1, 2, 3, 4]
    np.testing.assert_allclose([multi[s] for s in range(1, 5)], [single[s] for s in range(1, 5)], rtol=1e-5)


@pytest.mark.slow
def test_sigterm_on_one_process_stops_both_at_the_same_step(tmp_path):
    """Only process 1 gets SIGTERM; the stop is agreed each step (train.distributed.any_process), so
    both enter the collective save of the same step, and both exit 0."""
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "hybrax.train", "--config", "configs/quickstart.yaml", "--run-dir",
                               str(tmp_path), "--coordinator", f"localhost:{port}", "--num-processes", "2",
                               "--process-id", str(i), *MODEL, "mesh.data=2", "mesh.seq=4", "train.steps=100000",
                               "checkpoint.every=100000"],
                              cwd=ROOT, env=_environment(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    deadline = time.monotonic() + 300
    while not ((tmp_path / "metrics.jsonl").exists() and len(_train_losses(tmp_path)) >= 3):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGTERM)
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    saved = int(outputs[0].split("SIGTERM: saved checkpoint at step ")[1].split()[0])
    assert [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()] == [saved]
    assert max(_train_losses(tmp_path)) == saved


@pytest.mark.parametrize("kwargs,environ,message", [
    ({"num_processes": 2, "process_id": 0}, {}, "need a coordinator"),
    ({"coordinator": "localhost:1"}, {}, "the number of processes and this process's id are not"),
    ({}, {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
     "process id 2 must be in \\[0, 2\\)"),
])
def test_incomplete_settings_are_one_line_errors(kwargs, environ, message):
    with pytest.raises(DistributedConfigError, match=message):
        settings(**kwargs, environ=environ)


def test_settings_from_flags_or_environment():
    assert settings(environ={}) is None
    env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    assert settings(environ=env) == {"coordinator_address": "h:1", "num_processes": 2, "process_id": 1}
    assert settings("x:2", 4, 3, environ=env) == {"coordinator_address": "x:2", "num_processes": 4, "process_id": 3}
