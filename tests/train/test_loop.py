"""End to end through the command line, on a tiny model and the real corpus: a run writes its
config, metrics, checkpoints and a sample; SIGTERM saves and exits 0 (SIGKILL at five moments:
test_faults.py); a non-finite loss stops without touching the last good checkpoint."""

import math
import re
import signal
import subprocess
import sys
import time

import pytest
from trainer_cli import ROOT, command, finished_checkpoints, metrics, run, train_losses, tree_digest, wait_for_step

pytestmark = pytest.mark.slow


def test_run_writes_everything_and_sample_cli_reads_it(tmp_path):
    result = run(tmp_path, "train.steps=20")
    assert result.returncode == 0, result.stdout + result.stderr
    records = metrics(tmp_path)
    assert sorted(train_losses(records)) == list(range(1, 21))
    final = [r for r in records if "val_bpb" in r][-1]
    assert final["step"] == 20 and 0 < final["val_bpb"] < 8.1  # below uniform over 259 ids
    for key in ("loss", "tokens_per_s", "tflops", "mfu", "lr", "grad_norm"):
        assert key in records[0]
    assert "model:" in result.stdout and "parameters" in result.stdout and "MFU" in result.stdout
    assert re.search(r"decoding cache [\d.]+ KiB/token \|", result.stdout), result.stdout[:3000]
    assert (tmp_path / "config.yaml").read_text().startswith("model:")
    assert finished_checkpoints(tmp_path)[-1] == 20
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "samples.txt").read_text().startswith("ROMEO:")
    sample = subprocess.run([sys.executable, "-m", "hybrax.train.sample", "--run", str(tmp_path), "--prompt", "KING:",
                             "--max-new-tokens", "30"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert sample.returncode == 0, sample.stderr
    assert sample.stdout.startswith("KING:") and len(sample.stdout) > len("KING:")


def test_sigterm_saves_and_exits_zero(tmp_path):
    proc = subprocess.Popen(command(tmp_path, "train.steps=400", "checkpoint.every=1000"), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_step(proc, tmp_path, 6)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    saved = int(out.split("SIGTERM: saved checkpoint at step ")[1].split()[0])
    assert saved >= 6 and finished_checkpoints(tmp_path) == [saved]
    resumed = run(tmp_path, "--resume", "train.steps=400", "checkpoint.every=1000", "train.steps=" + str(saved + 3))
    assert f"resumed from checkpoint at step {saved}" in resumed.stdout


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    assert run(tmp_path, "train.steps=8").returncode == 0
    assert finished_checkpoints(tmp_path) == [4, 8]
    digest = tree_digest(tmp_path / "checkpoints")
    diverged = run(tmp_path, "--resume", "train.steps=30", "optim.lr=1e30", "optim.grad_clip=0", "checkpoint.every=1000")
    assert diverged.returncode == 1, diverged.stdout + diverged.stderr
    line = [ln for ln in diverged.stdout.splitlines() if ln.startswith("error: ")]
    assert line and "stopped without saving, the last good checkpoint is step 8" in line[0]
    assert finished_checkpoints(tmp_path) == [4, 8]
    assert tree_digest(tmp_path / "checkpoints") == digest


def test_a_nan_gradient_never_reaches_a_checkpoint(tmp_path):
    """lr 1e4: step 7's loss is finite but its gradient norm is not, so the update would poison the
    state that checkpoint 7 saves. The guard stops at step 7 without saving and names a finite
    checkpoint; a rerun with a sane lr resumes from it and trains to the end."""
    poisoned = run(tmp_path, "train.steps=60", "optim.lr=1e4", "checkpoint.every=7", "train.eval_every=100")
    assert poisoned.returncode == 1, poisoned.stdout + poisoned.stderr
    line = [ln for ln in poisoned.stdout.splitlines() if ln.startswith("error: ")]
    assert len(line) == 1 and "stopped without saving" in line[0], poisoned.stdout
    saved = finished_checkpoints(tmp_path)
    assert "grad_norm is nan" in line[0] and "at step 7" in line[0]
    assert (f"last good checkpoint is step {saved[-1]}" if saved else "there is no checkpoint yet") in line[0]
    recovered = run(tmp_path, "--resume", "train.steps=60", "optim.lr=1e-3", "checkpoint.every=7",
                    "train.eval_every=100", "log.sample_tokens=0")
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    losses = train_losses(metrics(tmp_path))
    assert max(losses) == 60 and all(math.isfinite(v) for step, v in losses.items() if step > (saved or [0])[-1])


def test_a_second_trainer_on_the_same_directory_fails_at_once(tmp_path):
    """The first trainer holds the run directory's lock; the second exits 1 with one line naming it
    before compiling anything; the first, stopped by SIGTERM, saves and exits 0 as usual."""
    first = subprocess.Popen(command(tmp_path, "train.steps=100000", "checkpoint.every=100000"), cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lock = tmp_path / ".lock"
    deadline = time.monotonic() + 120
    while not (lock.exists() and lock.read_text().startswith("pid")) and time.monotonic() < deadline:
        time.sleep(0.2)
    t = time.perf_counter()
    second = run(tmp_path, "train.steps=100000", "checkpoint.every=100000")
    seconds = time.perf_counter() - t
    while not metrics(tmp_path) and time.monotonic() < deadline + 120:
        time.sleep(0.2)   # the first is training (SIGTERM during its compile is another matter)
    first.send_signal(signal.SIGTERM)
    out, _ = first.communicate(timeout=300)
    errors = [line for line in second.stderr.splitlines() if line.startswith("error: ")]
    assert second.returncode == 1 and len(errors) == 1 and "Traceback" not in second.stderr, second.stderr
    assert f"is in use by pid {first.pid} on host" in errors[0] and "compile" not in second.stdout and seconds < 60
    assert first.returncode == 0 and "SIGTERM: saved checkpoint" in out, out
    assert len(finished_checkpoints(tmp_path)) == 1


def test_sigterm_before_the_first_step_exits_0(tmp_path):
    """SIGTERM while the trainer sets up and compiles: exit 0 with one line, nothing saved, no -15."""
    proc = subprocess.Popen(command(tmp_path, "train.steps=100000"), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lock, deadline = tmp_path / ".lock", time.monotonic() + 120
    while not (lock.exists() and lock.read_text().startswith("pid")) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)   # the lock is taken before restore and compile
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "SIGTERM before the first step: nothing new to save (latest checkpoint: step None)" in out
    assert finished_checkpoints(tmp_path) == [] and not metrics(tmp_path)


def test_moe_run_logs_load_per_layer_and_resumes(tmp_path):
    """configs/moe.yaml on a tiny shape (2 layers: ffns [swiglu, moe] puts the MoE at layer 1): the
    layer logs its load per expert (a list in metrics.jsonl, a histogram in TensorBoard), imbalance
    and aux losses; a rerun with more steps resumes from the checkpoint, router state included."""
    moe = ["model.moe.num_experts=4", "model.moe.expert_hidden=32", "model.moe.bias_update_rate=1e-3"]
    result = run(tmp_path, *moe, "train.steps=4", config="configs/moe.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "active per token" in result.stdout and "max load/mean" in result.stdout
    record = [r for r in metrics(tmp_path) if "tokens_per_s" in r][-1]
    load = record["aux/blocks/1/ffn/load"]
    assert len(load) == 4 and abs(sum(load) - 1.0) < 1e-5
    assert abs(record["aux/blocks/1/ffn/imbalance"] - max(load) * 4) < 1e-5
    assert record["aux/blocks/1/ffn/balance_loss"] > 0 and record["aux/blocks/1/ffn/router_z_loss"] > 0
    assert not any(key.startswith("aux/blocks/0/") for key in record)
    events = b"".join(p.read_bytes() for p in (tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert b"aux/blocks/1/ffn/load" in events   # a vector is written only as a histogram
    resumed = run(tmp_path, "--resume", *moe, "train.steps=6", config="configs/moe.yaml")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from checkpoint at step 4" in resumed.stdout
    assert sorted(train_losses(metrics(tmp_path))) == list(range(1, 7))


def test_run_log_names_each_kernel_and_a_strict_refusal_stops_before_compiling(tmp_path):
    ran = run(tmp_path / "auto", "train.steps=1", "log.sample_tokens=0")
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert "kernel dot_product_attention: xla (auto on cpu)" in ran.stdout
    refused = run(tmp_path / "strict", "train.steps=1", "model.kernels.attention=cudnn", "model.kernels.strict=true")
    assert refused.returncode == 2
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert errors == [refused.stderr.strip().splitlines()[-1]] and "Traceback" not in refused.stderr
    assert "dot_product_attention: implementation 'cudnn' refused these inputs on cpu" in errors[0]
    assert finished_checkpoints(tmp_path / "strict") == [] and metrics(tmp_path / "strict") == []
