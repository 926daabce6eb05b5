"""The fault suite: each fault a hostile user or a bad day can bring, reproduced through the command
line, and the outcome asserted. Nothing already saved is lost, nothing fails silently, and every
anticipated failure is one `error:` line with exit status 2 (the command asked for it) or 1 (it
happened), never a traceback.

- bad input of every kind: one line, exit 2, before compile, the run directory untouched;
- SIGKILL at five moments, then a rerun: every step's loss equals an uninterrupted run's, once;
- a corrupt latest checkpoint (a truncated file, no metadata): one warning line, resume from the
  previous one, the losses of an uninterrupted run;
- a changed config: refused, then accepted with --resume (old config kept) or --fresh (moved);
- a disk that fills up during a save (a small tmpfs): one line within a few steps, the earlier
  checkpoints intact, and a rerun after freeing space resumes exactly.
"""

import json
import os
import pathlib
import signal
import subprocess
import time

import pytest
from trainer_cli import ROOT, command, finished_checkpoints, metrics, run, train_losses, tree_digest

pytestmark = pytest.mark.slow
STEPS = ["train.steps=24", "train.eval_every=12", "train.eval_batches=16", "log.sample_tokens=0",
         "log.tensorboard=false"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, float]:
    """The losses of an uninterrupted run."""
    run_dir = tmp_path_factory.mktemp("reference")
    result = run(run_dir, *STEPS)
    assert result.returncode == 0, result.stderr[-2000:]
    return train_losses(metrics(run_dir))


def assert_each_step_once_and_equal(run_dir, reference):
    records = [r for r in metrics(run_dir) if "tokens_per_s" in r]
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)) == list(range(1, 25)), steps
    assert train_losses(metrics(run_dir)) == reference   # to the last bit
    evals = [r["step"] for r in metrics(run_dir) if "val_loss" in r]
    assert evals == [12, 24]


def one_error_line(result) -> str:
    errors = [line for line in result.stderr.splitlines() + result.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
    return errors[0]


# --- SIGKILL at five moments ------------------------------------------------------------------


def _between_saves(run_dir):
    return any(r["step"] == 6 for r in metrics(run_dir))   # checkpoints at 4 and 8


def _mid_save(run_dir):
    return any(p.name.endswith("orbax-checkpoint-tmp") for p in (run_dir / "checkpoints").glob("*")) \
        if (run_dir / "checkpoints").exists() else False


def _right_after_a_save(run_dir):
    return 8 in finished_checkpoints(run_dir)


def _during_eval(run_dir):
    records = metrics(run_dir)
    return any(r["step"] == 12 and "tokens_per_s" in r for r in records) and not any("val_loss" in r for r in records)


def _during_the_final_save(run_dir):
    return any(r["step"] == 24 and "val_loss" in r for r in metrics(run_dir)) and 24 not in finished_checkpoints(run_dir)


MOMENTS = {"between saves": _between_saves, "mid-save": _mid_save, "right after a save": _right_after_a_save,
           "during eval": _during_eval, "during the final save": _during_the_final_save}


@pytest.mark.parametrize("moment", MOMENTS)
def test_sigkill_then_rerun_equals_an_uninterrupted_run(tmp_path, reference, moment):
    proc = subprocess.Popen(command(tmp_path, *STEPS), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not MOMENTS[moment](tmp_path):
        assert proc.poll() is None and time.monotonic() < deadline, f"{moment}: not reached"
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = run(tmp_path, *STEPS)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_each_step_once_and_equal(tmp_path, reference)


# --- corrupt checkpoints --------------------------------------------------------------------


def _truncate_largest_file(folder: pathlib.Path):
    largest = max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    os.truncate(largest, largest.stat().st_size // 3)


CORRUPTIONS = {
    "truncated data file": lambda step: _truncate_largest_file(step / "state"),
    "missing metadata": lambda step: (step / "state" / "_METADATA").unlink(),
    "truncated, no manifest": lambda step: (_truncate_largest_file(step / "state"),
                                            (step / "hybrax_manifest.json").unlink()),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path, reference, corruption):
    """The run ends with checkpoints 20 and 24 (keep 2); 24 is damaged, the rerun warns in one line,
    resumes from 20, moves 24 aside, and its losses from step 21 on are the uninterrupted run's."""
    first = run(tmp_path, *STEPS)
    assert first.returncode == 0 and finished_checkpoints(tmp_path) == [20, 24], first.stderr[-2000:]
    CORRUPTIONS[corruption](tmp_path / "checkpoints" / "24")
    intact = tree_digest(tmp_path / "checkpoints" / "20")
    resumed = run(tmp_path, *STEPS)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    warnings = [line for line in resumed.stdout.splitlines() if line.startswith("warning: checkpoint")]
    assert len(warnings) == 1 and "trying the previous checkpoint" in warnings[0], resumed.stdout
    print(f"{corruption}: {warnings[0]}")
    assert "resumed from checkpoint at step 20" in resumed.stdout
    assert "Traceback" not in resumed.stderr and "Exception" not in resumed.stderr, resumed.stderr[-3000:]
    assert (tmp_path / "unreadable_checkpoints" / "24").is_dir() and finished_checkpoints(tmp_path) == [20, 24]
    assert tree_digest(tmp_path / "checkpoints" / "20") == intact
    assert_each_step_once_and_equal(tmp_path, reference)


# --- changed config -------------------------------------------------------------------------


def test_a_changed_config_is_refused_then_resumed_or_started_fresh(tmp_path):
    assert run(tmp_path, "train.steps=8", "log.sample_tokens=0").returncode == 0
    before = tree_digest(tmp_path)
    refused = run(tmp_path, "train.steps=12", "optim.lr=1e-3", "log.sample_tokens=0")
    line = one_error_line(refused)
    assert refused.returncode == 2 and "optim.lr: 0.003 -> 0.001; train.steps: 8 -> 12" in line
    assert tree_digest(tmp_path) == before
    below = run(tmp_path, "--resume", "train.steps=4", "log.sample_tokens=0")
    assert below.returncode == 2 and "train.steps=4 is below the checkpoint" in one_error_line(below)

    resumed = run(tmp_path, "train.steps=12", "optim.lr=1e-3", "log.sample_tokens=0", "--resume")
    assert resumed.returncode == 0 and "resumed from checkpoint at step 8" in resumed.stdout, resumed.stderr
    assert "lr: 0.003" in (tmp_path / "config.8.yaml").read_text()
    assert "lr: 0.001" in (tmp_path / "config.yaml").read_text()

    fresh = run(tmp_path, "train.steps=4", "log.sample_tokens=0", "--fresh")
    assert fresh.returncode == 0, fresh.stderr
    replaced = list((tmp_path / "replaced").iterdir())
    assert len(replaced) == 1 and finished_checkpoints(replaced[0]) == [8, 12]
    assert [r["step"] for r in metrics(tmp_path) if "tokens_per_s" in r] == [1, 2, 3, 4]


# --- disk full --------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs (mounting needs root; skipped elsewhere)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_disk_that_fills_during_a_save_stops_in_one_line_and_resumes_exactly(small_disk, reference):
    """A filler takes every free byte the moment the save of step 8 starts. Either that save fails
    (found within a few steps) or, if it won the race, the next save does not start for lack of space:
    one line, exit 1, checkpoint 4 (and 8 if it finished) intact. Freed, a rerun resumes exactly."""
    run_dir = small_disk / "run"
    proc = subprocess.Popen(command(run_dir, *STEPS), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (4 in finished_checkpoints(run_dir) and _mid_save(run_dir)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.0005)
    filler = small_disk / "filler"
    with open(filler, "wb") as f:   # every free byte, in 64 KiB pieces (tmpfs has no fallocate limit)
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    kept = {step: tree_digest(run_dir / "checkpoints" / str(step)) for step in finished_checkpoints(run_dir)}
    out, err = proc.communicate(timeout=300)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    line = one_error_line(result)
    assert proc.returncode == 1, out + err
    assert "last good checkpoint is step 4" in line or "last good checkpoint is step 8" in line, line
    found = int(line.split("after step ")[1].split()[0].rstrip(";,:"))
    assert 8 <= found <= 8 + 5, line
    print(f"disk full during the save of step 8, found after step {found}: {line}")
    for step, digest in kept.items():
        assert tree_digest(run_dir / "checkpoints" / str(step)) == digest
    filler.unlink()
    resumed = run(run_dir, *STEPS)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_each_step_once_and_equal(run_dir, reference)


# --- bad input ------------------------------------------------------------------------------


def _bad_data(tmp_path: pathlib.Path) -> dict[str, pathlib.Path]:
    made = {"empty dir": tmp_path / "empty", "empty txt": tmp_path / "empty.txt", "binary txt": tmp_path / "b.txt",
            "jsonl without the field": tmp_path / "f.jsonl", "malformed jsonl": tmp_path / "m.jsonl"}
    made["empty dir"].mkdir()
    made["empty txt"].write_text("")
    made["binary txt"].write_bytes(bytes(range(256)) * 4)
    made["jsonl without the field"].write_text(json.dumps({"content": "words " * 50}) + "\n")
    made["malformed jsonl"].write_text('{"text": "fine"}\n{"text": \n')
    return made


BAD_OVERRIDES = {   # the 24 kinds, then more
    "negative lr": ["optim.lr=-1"], "nan lr": ["optim.lr=nan"], "beta1 2": ["optim.beta1=2"],
    "negative warmup": ["optim.warmup_steps=-5"], "3 mixers for 2 layers": ["model.mixers=[attention,gla,attention]"],
    "keep 0": ["checkpoint.keep=0"], "eval_batches 0": ["train.eval_batches=0"], "every 0": ["checkpoint.every=0"],
    "unknown key": ["optim.lrr=1"], "bad type": ["train.steps=many"], "heads do not divide": ["model.num_heads=3"],
    "unknown mixer": ["model.mixers=[attentoin]"], "missing data path": ["data.source=files", "data.path=/nope"],
    "mesh too big": ["mesh.data=64"], "negative steps": ["train.steps=-1"], "bad dtype": ["model.dtype=float7"],
    "unknown kernel": ["model.kernels.attention=nope"], "bad val_fraction": ["data.val_fraction=1.5"],
    "zero batch": ["data.batch_size=0"], "unknown play": ["data.val_plays=[hamlett]"], "not key=value": ["steps"],
    "bad layer key": ["model.gla.chunk_sise=4"], "eps 0": ["optim.eps=0"], "min_lr_ratio 2": ["optim.min_lr_ratio=2"],
}


def test_every_bad_input_is_one_line_before_compile(tmp_path):
    cases = {name: overrides for name, overrides in BAD_OVERRIDES.items()}
    for name, path in _bad_data(tmp_path).items():
        cases[name] = ["data.source=files", f"data.path={path}"]
    cases["unknown preset"] = ["--config", "nope.yaml"]
    outcomes = {}
    for name, overrides in cases.items():
        run_dir = tmp_path / "runs" / name.replace(" ", "_")
        config = overrides[1] if overrides[0] == "--config" else "configs/quickstart.yaml"
        result = run(run_dir, *[o for o in overrides if o not in ("--config", config)], config=config)
        line = one_error_line(result)
        assert result.returncode == 2 and "compile" not in result.stdout, (name, result.stdout[-500:], line)
        assert not (run_dir / "checkpoints").exists() or not finished_checkpoints(run_dir), name
        outcomes[name] = line
    print(f"{len(outcomes)} bad inputs, each one line and exit 2 before compile:")
    for name, line in outcomes.items():
        print(f"  {name}: {line}")
    assert len(outcomes) >= 30


def test_a_data_state_that_does_not_fit_is_one_line(tmp_path):
    """Resumed (--resume) with a sequence length the checkpoint's data position was not made for."""
    assert run(tmp_path, "train.steps=4", "log.sample_tokens=0").returncode == 0
    resumed = run(tmp_path, "--resume", "train.steps=8", "data.seq_len=32", "log.sample_tokens=0")
    line = one_error_line(resumed)
    assert resumed.returncode == 2 and "data state does not match" in line and "seq_len" in line
    assert "compile" not in resumed.stdout
