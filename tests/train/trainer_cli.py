"""The trainer through its command line, for the end-to-end tests: a tiny model on the real corpus,
run to completion or started and watched, and what it leaves in its run directory."""

import hashlib
import json
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = ["model.d_model=64", "model.num_layers=2", "model.num_heads=2", "data.seq_len=64", "data.batch_size=8",
        "train.log_every=1", "train.eval_every=20", "train.eval_batches=2", "checkpoint.every=4",
        "log.progress_bar=false", "log.sample_tokens=16"]


def command(run_dir, *overrides, config="configs/quickstart.yaml"):
    return [sys.executable, "-m", "hybrax.train", "--config", config, "--run-dir", str(run_dir), *TINY, *overrides]


def run(run_dir, *overrides, timeout=300, config="configs/quickstart.yaml"):
    return subprocess.run(command(run_dir, *overrides, config=config), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def metrics(run_dir) -> list[dict]:
    path = pathlib.Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def train_losses(records) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if "tokens_per_s" in r}


def finished_checkpoints(run_dir) -> list[int]:
    folder = pathlib.Path(run_dir) / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []


def tree_digest(folder) -> str:
    h = hashlib.sha256()
    for p in sorted(pathlib.Path(folder).rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode() + p.read_bytes())
    return h.hexdigest()


def wait_for_step(proc, run_dir, step, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(r["step"] >= step for r in metrics(run_dir)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.stdout.read()}")
        time.sleep(0.005)
    raise AssertionError(f"step {step} not reached in {timeout}s")
