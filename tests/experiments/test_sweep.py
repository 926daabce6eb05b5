"""Sweeps: the grid expands to named runs with resolved configs, the records carry the compute
accounting of the configs, bad sweep files fail in one line before any run, and an end-to-end
sweep of two tiny runs writes two records and skips them when rerun. A sweep stopped by SIGTERM
stops its trainers at a checkpoint, one killed by SIGKILL takes them with it, a record cut short is
redone, and wall_s sums every invocation of a run."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

from hybrax.configs import DIRECTORY
from hybrax.experiments.sweep import RunStopped, load_sweep, main, record
from hybrax.experiments.sweep_records import SweepError, completed, end_invocation, start_invocation
TINY = ["model.d_model=16", "model.num_layers=1", "model.num_heads=2", "data.seq_len=32", "data.batch_size=4",
        "train.eval_batches=1", "train.log_every=1", "log.sample_tokens=0", "log.progress_bar=false",
        "log.tensorboard=false", "checkpoint.every=1000"]


def write(tmp_path, text: str) -> pathlib.Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


def test_grid_expands_to_the_product_with_names_and_arch(tmp_path):
    path = write(tmp_path, """
base: configs/quickstart.yaml
overrides: [model.num_layers=1]
grid:
  arch:
    attention: ["model.mixers=[attention]"]
    gla: ["model.mixers=[gla]"]
  model.d_model: [32, 64, 96]
  tokens:
    short: [train.steps=10]
""")
    _, runs = load_sweep(path)
    assert [r.name for r in runs][:3] == ["attention-32-short", "attention-64-short", "attention-96-short"]
    assert len(runs) == 6 and {r.arch for r in runs} == {"attention", "gla"}
    last = runs[-1]
    assert last.overrides == ("model.num_layers=1", "model.mixers=[gla]", "model.d_model=96", "train.steps=10")
    assert last.config.model.d_model == 96 and last.config.model.mixers == ["gla"] and last.config.train.steps == 10


@pytest.mark.parametrize("text,message", [
    ("grid: {a: {x: [train.steps=1]}}", "must be a mapping with keys base and grid"),
    ("base: configs/quickstart.yaml\ngrid: {size: [1, 2]}", "grid.size must map point names to override lists"),
    ("base: configs/quickstart.yaml\ngrid: {size: {s: [steps]}}", "grid.size.s must be a list of key=value"),
    ("base: configs/quickstart.yaml\ngrid: {model.d_modl: [32]}", "run 32: unknown config key 'model.d_modl'"),
])
def test_bad_sweep_files_fail_in_one_line(tmp_path, text, message):
    with pytest.raises(SweepError, match=message.replace("[", r"\[")) as info:
        load_sweep(write(tmp_path, text))
    assert "\n" not in str(info.value)


def test_record_holds_the_compute_accounting(tmp_path):
    path = write(tmp_path, "base: configs/quickstart.yaml\ngrid: {arch: {moe: ['model.ffns=[moe]', train.steps=7]}}")
    (run,) = load_sweep(path)[1]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 7, "val_loss": 1.5, "val_bpb": 2.1}) + "\n")
    end_invocation(run_dir, 12.0)
    r = record(run, run_dir)
    m, d = run.config.model, run.config.data
    assert r["tokens"] == 7 * d.batch_size * d.seq_len
    assert r["flops"] == 3 * m.flops_per_token(d.seq_len) * r["tokens"]
    assert r["params"] == m.num_params() and r["non_embedding_params"] == m.num_params() - m.vocab_size * m.d_model
    assert r["active_params"] == m.num_active_params() < r["params"]      # MoE: top-k of the experts
    assert (r["arch"], r["val_loss"], r["val_bpb"], r["wall_s"]) == ("moe", 1.5, 2.1, 12.0)


@pytest.mark.parametrize("path", sorted((DIRECTORY / "sweeps").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_sweeps_load(path):
    """Every run of every sweep in configs/sweeps resolves to a valid config under its own name, and
    runs long enough to finish its warmup."""
    _, runs = load_sweep(path)
    assert len({r.name for r in runs}) == len(runs)
    assert all(r.config.train.steps > r.config.optim.warmup_steps for r in runs)


def test_paths_resolve_from_any_working_directory(tmp_path, monkeypatch):
    """A shipped sweep by name; a base next to the sweep file first, then the working directory's,
    then a shipped preset's."""
    monkeypatch.chdir(tmp_path)
    tree, runs = load_sweep("tiny")
    assert pathlib.Path(tree["base"]) == DIRECTORY / "quickstart.yaml" and len(runs) == 24
    (tmp_path / "sub").mkdir()
    sweep = tmp_path / "sub" / "sweep.yaml"
    sweep.write_text("base: mine.yaml\ngrid: {model.d_model: [32]}")
    (tmp_path / "mine.yaml").write_text("base: quickstart.yaml\ntrain: {steps: 5}")
    assert load_sweep(sweep)[1][0].config.train.steps == 5                   # the working directory's
    (tmp_path / "sub" / "mine.yaml").write_text("base: quickstart.yaml\ntrain: {steps: 6}")
    assert load_sweep(sweep)[1][0].config.train.steps == 6                   # the one next to the sweep
    with pytest.raises(SweepError, match="sweep file 'nope.yaml' does not exist, here or among the shipped"):
        load_sweep("nope.yaml")
    sweep.write_text("base: gone.yaml\ngrid: {model.d_model: [32]}")
    with pytest.raises(SweepError, match="base 'gone.yaml' is neither in its folder, here, nor a shipped preset"):
        load_sweep(sweep)


def test_flops_budget_sets_the_steps_from_each_runs_own_flops(tmp_path):
    """One budget buys each architecture and size the steps its own flops_per_token allows: the
    training FLOPs are within half a step of the budget, and a costlier model gets fewer steps."""
    path = write(tmp_path, """
base: configs/quickstart.yaml
overrides: [model.num_layers=2, data.seq_len=128, data.batch_size=16]
grid:
  arch:
    attention: ["model.mixers=[attention]"]
    gla: ["model.mixers=[gla]"]
  model.d_model: [32, 64]
  sweep.flops: [3e11, 1e12]
""")
    runs = load_sweep(path)[1]
    assert [r.name for r in runs][:2] == ["attention-32-3e11", "attention-32-1e12"]
    steps = {}
    for run in runs:
        m, d, t = run.config.model, run.config.data, run.config.train
        per_step = 3 * m.flops_per_token(d.seq_len) * d.batch_size * d.seq_len
        assert abs(t.steps * per_step - run.budget_flops) <= per_step / 2, run.name
        assert run.overrides[-1] == f"train.steps={t.steps}" and not any("sweep." in o for o in run.overrides)
        steps[run.name] = t.steps
    assert steps["attention-64-1e12"] < steps["attention-32-1e12"]
    assert steps["gla-32-1e12"] != steps["attention-32-1e12"]             # GLA's FLOPs per token differ
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": runs[1].config.train.steps, "val_loss": 1.5,
                                                       "val_bpb": 2.1}) + "\n")
    r = record(runs[1], run_dir)
    assert r["budget_flops"] == 1e12 and r["flops"] == pytest.approx(1e12, rel=0.01)


@pytest.mark.parametrize("grid,message", [
    ("{b: {x: [sweep.flops=1e3]}}", "sweep.flops=1000 is less than one step"),
    ("{b: {x: [sweep.flops=-5]}}", "sweep.flops=-5 must be a positive number of FLOPs"),
    ("{b: {x: [sweep.flops=lots]}}", "sweep.flops='lots' must be a number of FLOPs"),
    ("{b: {x: [sweep.flops=1e12, train.steps=5]}}", "both sweep.flops and train.steps are set"),
    ("{b: {x: [sweep.tokens=1e6]}}", "unknown sweep key 'sweep.tokens'"),
])
def test_bad_budgets_fail_in_one_line(tmp_path, grid, message):
    with pytest.raises(SweepError, match=message) as info:
        load_sweep(write(tmp_path, f"base: configs/quickstart.yaml\ngrid: {grid}"))
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_sweep_runs_then_skips_completed_runs(tmp_path):
    path = write(tmp_path, "base: configs/quickstart.yaml\noverrides: " + json.dumps(TINY) + """
grid:
  arch:
    attention: ["model.mixers=[attention]"]
    gla: ["model.mixers=[gla]"]
  tokens:
    t: [train.steps=3, train.eval_every=3]
""")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "hybrax.experiments.sweep", str(path), "--out", str(out)]
    first = subprocess.run(command + ["--jobs", "2"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["name"] for r in records) == ["attention-t", "gla-t"]
    for r in records:
        assert r["tokens"] == 3 * 4 * 32 and r["val_loss"] > 0 and r["wall_s"] > 0
    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and len((out / "results.jsonl").read_text().splitlines()) == 2
    dry = subprocess.run(command + ["--dry-run"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert dry.stdout.count("done") == 2


def test_a_record_cut_short_is_dropped_and_its_run_redone(tmp_path, capsys):
    """A sweep killed while appending a record leaves a partial last line: it is dropped with one
    warning line (the file rewritten without it; --dry-run only warns), and that run is todo."""
    path = write(tmp_path, "base: configs/quickstart.yaml\ngrid: {model.d_model: [32, 64, 96]}")
    out = tmp_path / "out"
    out.mkdir()
    results = out / "results.jsonl"
    good = "".join(json.dumps({"name": name, "val_loss": 1.0}) + "\n" for name in ("32", "64"))
    results.write_text(good + '{"name": "96", "val_lo')
    assert main([str(path), "--out", str(out), "--dry-run"]) == 0
    shown = capsys.readouterr()
    assert re.findall(r"^(done|todo) +(\S+)", shown.out, re.M) == [("done", "32"), ("done", "64"), ("todo", "96")]
    warning = f"warning: {results} line 3 (run 96) was cut short, the sweep killed while writing it; "
    assert shown.err == warning + "that run is redone\n"
    assert results.read_text().endswith('"val_lo')                        # a dry run changes nothing
    assert completed(out) == {"32", "64"} and results.read_text() == good
    assert capsys.readouterr().err == warning + "dropped it, that run is redone\n"
    assert completed(out) == {"32", "64"} and capsys.readouterr().err == ""   # repaired: no second warning
    results.write_text(good.removesuffix("\n"))       # a whole last record missing its newline is kept
    assert completed(out) == {"32", "64"} and results.read_text() == good


@pytest.mark.parametrize("middle,why", [("not json", "Expecting value"), ("[1, 2]", "not a mapping with a name")])
def test_a_malformed_record_before_the_last_fails_in_one_line(tmp_path, middle, why):
    (tmp_path / "results.jsonl").write_text(f'{{"name": "a"}}\n{middle}\n{{"name": "b"}}\n')
    with pytest.raises(SweepError, match=rf"results.jsonl line 2 is not a JSON record \({why}.*\); fix or delete") as info:
        completed(tmp_path)
    assert "\n" not in str(info.value)


def test_wall_s_sums_every_invocation(tmp_path):
    """Ended invocations add their seconds, failed ones included; one left open by a sweep killed
    mid-run ends at its trainer's last write into the run directory. A run stopped before its last
    step has no record."""
    path = write(tmp_path, "base: configs/quickstart.yaml\ngrid: {t: {x: [train.steps=7]}}")
    (run,) = load_sweep(path)[1]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    start_invocation(run_dir)
    assert end_invocation(run_dir, 5.0) == 5.0                            # a trainer that failed
    start_invocation(run_dir)                                             # then the sweep is SIGKILLed
    since = json.loads((run_dir / "wall_s.json").read_text())["running_since"]
    for name, text, seconds in [("metrics.jsonl", json.dumps({"step": 3, "loss": 2.0}) + "\n", 1.0),
                                ("train.log", "SIGTERM: saved checkpoint at step 3\n", 7.0)]:
        (run_dir / name).write_text(text)
        os.utime(run_dir / name, (since + seconds, since + seconds))
    with pytest.raises(RunStopped, match=r"^run x stopped before its last step \(interrupted\); rerun the sweep to "
                                         r"resume it$"):
        record(run, run_dir)
    start_invocation(run_dir)                                             # the rerun
    assert json.loads((run_dir / "wall_s.json").read_text())["wall_s"] == pytest.approx(12.0)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 7, "val_loss": 1.5, "val_bpb": 2.0}) + "\n")
    assert end_invocation(run_dir, 3.0) == pytest.approx(15.0)
    assert record(run, run_dir)["wall_s"] == 15.0


def _steps(metrics: pathlib.Path) -> list[int]:
    steps = []
    for line in metrics.read_text().splitlines() if metrics.exists() else []:
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):   # a line being written
            pass
    return steps


def _wait_for(condition, what: str, timeout: float, log: pathlib.Path | None = None) -> float:
    """Seconds until `condition()` held; fails after `timeout` with the tail of `log`."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{tail}")
        time.sleep(0.05)
    return time.monotonic() - start


def _alive(pid: int) -> bool:
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")   # a zombie has exited, and waits for its new parent to reap it


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux's")
def test_a_stopped_or_killed_sweep_stops_its_trainer_and_resumes(tmp_path):
    """SIGTERM to the sweep: its trainer (in its own session) saves and exits, no record is written,
    and the sweep exits 143 with one line. SIGKILL to the sweep: the kernel sends the orphaned
    trainer SIGTERM, and it saves and exits. A third invocation finishes the run from its checkpoint,
    and the record's wall_s counts all three."""
    path = write(tmp_path, "base: configs/quickstart.yaml\noverrides: " + json.dumps(TINY + ["model.d_model=32"]) + """
grid:
  arch:
    attention: ["model.mixers=[attention]"]
  tokens:
    t: [train.steps=3000, train.eval_every=3000]
""")
    out = tmp_path / "out"
    run_dir = out / "runs" / "attention-t"
    command = [sys.executable, "-m", "hybrax.experiments.sweep", str(path), "--out", str(out)]

    def start_past(step: int) -> tuple[subprocess.Popen, int]:
        """A sweep whose trainer has logged a step past `step`, and the trainer's pid."""
        sweep = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait_for(lambda: max(_steps(run_dir / "metrics.jsonl"), default=0) > step or sweep.poll() is not None,
                  f"a trainer step past {step}", timeout=300)
        assert sweep.poll() is None, sweep.communicate()[1][-2000:]
        return sweep, int(re.match(r"pid (\d+) on host", (run_dir / ".lock").read_text())[1])

    sweep, trainer = start_past(0)
    assert os.getpgid(trainer) == trainer != sweep.pid                    # its own process group
    sweep.send_signal(signal.SIGTERM)
    _, err = sweep.communicate(timeout=120)
    assert sweep.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1] == ("error: sweep interrupted by SIGTERM: 1 running run stopped at a "
                                            "checkpoint; rerun the sweep to resume")
    assert not _alive(trainer) and not (out / "results.jsonl").exists()
    stopped = max(_steps(run_dir / "metrics.jsonl"))
    assert f"SIGTERM: saved checkpoint at step {stopped}" in (run_dir / "train.log").read_text()

    sweep, trainer = start_past(stopped)
    sweep.kill()
    sweep.communicate(timeout=60)
    exited = _wait_for(lambda: not _alive(trainer), "the orphaned trainer to exit", timeout=120,
                       log=run_dir / "train.log")
    print(f"the orphaned trainer saved and exited {exited:.1f} s after the sweep was killed")
    stopped_again = max(_steps(run_dir / "metrics.jsonl"))
    assert stopped_again > stopped
    assert f"SIGTERM: saved checkpoint at step {stopped_again}" in (run_dir / "train.log").read_text()

    start = time.monotonic()
    last = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    elapsed = time.monotonic() - start
    assert last.returncode == 0, last.stderr[-2000:]
    (result,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert result["name"] == "attention-t" and result["tokens"] == 3000 * 4 * 32 and result["val_loss"] > 0
    assert _steps(run_dir / "metrics.jsonl").count(1) == 1                # resumed, never restarted
    assert result["wall_s"] > elapsed
