"""Sweeps: a grid of training runs from one base config, one result record per run.

    hybrax-sweep tiny.yaml [--out DIR] [--jobs N] [--dry-run]

A sweep file is a path from the working directory or a shipped sweep's name (`tiny`, `tiny.yaml`,
`configs/sweeps/tiny.yaml`: hybrax.configs.DIRECTORY / "sweeps"). It names a base config (found next
to the sweep file, else from the working directory, else among the shipped presets), overrides for
every run, and a grid. Each grid axis maps point names to override lists; a key that is a config key
maps to a list of values (shorthand):

    name: tiny                           # sweep directory ./runs/sweeps/<name> (or --out)
    base: quickstart.yaml
    overrides: [log.sample_tokens=0]
    grid:
      arch:                              # the axis named `arch` labels the records' architecture
        attention: [model.mixers=[attention]]
        hybrid_gla: ["model.mixers=[gla, attention]"]
      model.d_model: [32, 64]            # shorthand: point names are the values
      tokens:
        short: [train.steps=100]
        long: [train.steps=300]

A run may name a training compute budget instead of its step count: `sweep.flops=3e11` (a sweep
key, not a config key) sets train.steps to the whole number of steps whose training FLOPs
(3 x the run's own forward flops_per_token x batch_size x seq_len per step) come nearest to the
budget. Every architecture and size then spends the same compute, whatever its attention or
recurrence costs, and the runs of one budget form an IsoFLOP profile:

      budget:
        1e11: [sweep.flops=1e11]
        1e12: [sweep.flops=1e12]

The grid expands to the product of its axes (run name: the point names joined by `-`). Every
run's config is resolved and checked before the first run starts. Runs whose record is already in
`<sweep>/results.jsonl` are skipped; an interrupted run resumes from its checkpoint. Runs go one
after another, or `--jobs N` at a time, each a `hybrax-train` process in its own session with its
log in `<sweep>/runs/<run>/train.log`.

Stopping: SIGTERM or Ctrl-C to the sweep sends SIGTERM to every running trainer, waits while each
saves a checkpoint and exits, and exits 128 + the signal's number with one line. A sweep that dies
any other way (SIGKILL included) takes its trainers with it: the kernel sends each one SIGTERM
(HYBRAX_PARENT_PID, hybrax.train.termination.follow_parent). A record cut short by a kill, the
last line of results.jsonl, is dropped with a warning when the sweep next starts, and its run
redone. Each finished run appends one JSON line to results.jsonl, in one write:

    name, arch, overrides        the run and its resolved overrides (sweep overrides, then grid)
    params                       total parameters (ModelConfig.num_params)
    non_embedding_params         params minus the token embedding (and the output head if untied)
    active_params                parameters one token uses (MoE: router, top_k and shared experts)
    tokens                       training tokens = steps x batch_size x seq_len
    flops                        training FLOPs = 3 x forward FLOPs per token x tokens; forward
                                 FLOPs count 2 per multiply-add of every matmul at seq_len,
                                 attention scores included (ModelConfig.flops_per_token)
    budget_flops                 the run's `sweep.flops` budget (only for runs that name one)
    val_loss, val_bpb            final validation loss (nats per token) and bits per byte
    wall_s                       seconds the run's trainer took (process start to exit), summed
                                 over every invocation, interrupted and failed ones included; kept
                                 in <sweep>/runs/<run>/wall_s.json between reruns of the sweep
"""

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import yaml
from tqdm import tqdm

from hybrax.configs import DIRECTORY
from hybrax.train.config import Config, ConfigError, find_preset, load_config
from hybrax.experiments.sweep_records import (SweepError, closed_wall_clock, completed, end_invocation, read_jsonl,
                                              start_invocation)
from hybrax.train.termination import PARENT_ENV

SWEEP_KEYS = {"name", "base", "overrides", "grid"}
BUDGET_KEY = "sweep.flops"   # an override that sets train.steps from a training-FLOPs budget


class RunStopped(RuntimeError):
    """A trainer stopped before its last step (SIGTERM: it saved a checkpoint and exited 0)."""


class Interrupted(Exception):
    """The sweep got SIGTERM or Ctrl-C; its `stopped` running trainers were sent SIGTERM, and
    waited for (they save a checkpoint and exit) unless a second interrupt came first."""

    def __init__(self, signal_name: str, stopped: int = 0, waited: bool = True):
        super().__init__(signal_name, stopped, waited)
        self.signal_name, self.stopped, self.waited = signal_name, stopped, waited

    def __str__(self) -> str:
        how = "Ctrl-C" if self.signal_name == "SIGINT" else self.signal_name
        runs = f"{self.stopped} running run{'s' * (self.stopped != 1)}"
        stopped = ("" if not self.stopped else f": {runs} stopped at a checkpoint" if self.waited else
                   f": {runs} sent SIGTERM (not waiting while each saves a checkpoint)")
        return f"sweep interrupted by {how}{stopped}; rerun the sweep to resume"

    @property
    def exit_code(self) -> int:
        return 128 + signal.Signals[self.signal_name]


@dataclasses.dataclass(frozen=True)
class Run:
    name: str
    arch: str
    overrides: tuple[str, ...]   # config overrides only: a budget is resolved into train.steps
    config: Config
    budget_flops: float | None = None


def _axis_points(axis: str, points) -> list[tuple[str, list[str]]]:
    """[(point name, overrides)] of one grid axis."""
    if isinstance(points, dict):
        out = []
        for point, overrides in points.items():
            overrides = [overrides] if isinstance(overrides, str) else overrides
            if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
                raise SweepError(f"grid.{axis}.{point} must be a list of key=value overrides, got {overrides!r}")
            out.append((str(point), list(overrides)))
        return out
    if isinstance(points, list) and points and "." in axis:
        return [(str(v), [f"{axis}={_yaml_value(v)}"]) for v in points]
    raise SweepError(f"grid.{axis} must map point names to override lists, or (for a config key such as "
                     f"model.d_model) be a non-empty list of values; got {points!r}")


def _yaml_value(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def find_sweep(name: str | pathlib.Path) -> pathlib.Path:
    """A sweep file from the working directory, else a shipped one (`tiny`, `tiny.yaml`)."""
    try:
        return find_preset(name, DIRECTORY / "sweeps")
    except ConfigError as e:
        raise SweepError(str(e).replace("config file", "sweep file", 1)) from None


def _find_base(base: str, sweep: pathlib.Path) -> pathlib.Path:
    """The sweep's base preset: next to the sweep file, else from the working directory, else shipped."""
    try:
        return (sweep.parent / base if (sweep.parent / base).is_file() else find_preset(base)).resolve()
    except ConfigError:
        raise SweepError(f"sweep file {str(sweep)!r}: base {base!r} is neither in its folder, here, "
                         f"nor a shipped preset") from None


def sweep_dir_of(tree: dict, path: str | pathlib.Path, out: str | pathlib.Path | None = None) -> pathlib.Path:
    """`out`, else runs/sweeps/<the sweep's name> in the working directory."""
    return pathlib.Path(out or pathlib.Path("runs") / "sweeps" / tree.get("name", pathlib.Path(path).stem))


def load_sweep(path: str | pathlib.Path) -> tuple[dict, list[Run]]:
    """(the sweep file's tree, its runs with resolved configs); every problem is one line."""
    path = find_sweep(path)
    tree = yaml.safe_load(path.read_text()) or {}
    if not isinstance(tree, dict) or set(tree) - SWEEP_KEYS or "base" not in tree or "grid" not in tree:
        raise SweepError(f"sweep file {str(path)!r} must be a mapping with keys base and grid (and optionally name, "
                         f"overrides); got {sorted(tree) if isinstance(tree, dict) else type(tree).__name__}")
    base = _find_base(str(tree["base"]), path)
    common = list(tree.get("overrides") or [])
    grid = tree["grid"]
    if not isinstance(grid, dict) or not grid:
        raise SweepError(f"grid must map axis names to points; got {grid!r}")
    axes = {axis: _axis_points(axis, points) for axis, points in grid.items()}
    runs = []
    for combination in itertools.product(*axes.values()):
        names = [point for point, _ in combination]
        overrides = tuple(common + [o for _, point_overrides in combination for o in point_overrides])
        name = "-".join(names)
        arch = dict(zip(axes, names)).get("arch", "default")
        overrides, budget = _split_budget(name, overrides)
        try:
            config = load_config(base, list(overrides))
            if budget is not None:
                overrides += (f"train.steps={steps_for_budget(name, config, budget)}",)
                config = load_config(base, list(overrides))
        except ConfigError as e:
            raise SweepError(f"run {name}: {e}") from None
        runs.append(Run(name, arch, overrides, config, budget))
    return {**tree, "base": str(base)}, runs


def _split_budget(name: str, overrides: tuple[str, ...]) -> tuple[tuple[str, ...], float | None]:
    """(the config overrides, the `sweep.flops` budget or None); other `sweep.` keys are errors."""
    config_overrides, budgets = [], []
    for override in overrides:
        key, _, value = override.partition("=")
        if not key.startswith("sweep."):
            config_overrides.append(override)
        elif key != BUDGET_KEY:
            raise SweepError(f"run {name}: unknown sweep key {key!r}; the only one is {BUDGET_KEY!r}")
        else:
            try:
                budgets.append(float(yaml.safe_load(value)))
            except (ValueError, TypeError, yaml.YAMLError):
                raise SweepError(f"run {name}: {BUDGET_KEY}={value!r} must be a number of FLOPs, e.g. 3e11") from None
            if not budgets[-1] > 0 or budgets[-1] == float("inf"):
                raise SweepError(f"run {name}: {BUDGET_KEY}={value} must be a positive number of FLOPs")
    if len(budgets) > 1:
        raise SweepError(f"run {name}: {BUDGET_KEY} is set {len(budgets)} times; a run has one budget")
    if budgets and any(o.startswith("train.steps=") for o in config_overrides):
        raise SweepError(f"run {name}: both {BUDGET_KEY} and train.steps are set; the budget decides the steps")
    return tuple(config_overrides), budgets[0] if budgets else None


def steps_for_budget(name: str, config: Config, budget: float) -> int:
    """The number of training steps whose FLOPs come nearest to `budget` (at least 1 step's worth)."""
    data = config.data
    per_step = 3 * config.model.flops_per_token(data.seq_len) * data.batch_size * data.seq_len
    steps = round(budget / per_step)
    if steps < 1:
        raise SweepError(f"run {name}: {BUDGET_KEY}={budget:g} is less than one step "
                         f"({per_step:.3g} training FLOPs at batch_size={data.batch_size}, seq_len={data.seq_len})")
    return steps


def record(run: Run, run_dir: pathlib.Path) -> dict:
    """The result record of a finished run (see the module docstring for the keys); RunStopped for a
    run whose trainer stopped early (on SIGTERM it saves a checkpoint and exits 0)."""
    model, data, train = run.config.model, run.config.data, run.config.train
    params = model.num_params()
    embedding = model.vocab_size * model.d_model * (1 if model.tie_embeddings else 2)
    tokens = train.steps * data.batch_size * data.seq_len
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    evals = [r for r in metrics if "val_loss" in r]
    if not evals or evals[-1]["step"] != train.steps:
        if max((r.get("step", 0) for r in metrics), default=0) < train.steps:
            raise RunStopped(f"run {run.name} stopped before its last step (interrupted); rerun the sweep to resume it")
        raise RuntimeError(f"run {run.name} finished without a final evaluation in {run_dir / 'metrics.jsonl'}")
    budget = {} if run.budget_flops is None else {"budget_flops": run.budget_flops}
    return {"name": run.name, "arch": run.arch, "overrides": list(run.overrides), "params": params,
            "non_embedding_params": params - embedding, "active_params": model.num_active_params(),
            "tokens": tokens, "flops": 3 * model.flops_per_token(data.seq_len) * tokens, **budget,
            "val_loss": evals[-1]["val_loss"], "val_bpb": evals[-1]["val_bpb"],
            "wall_s": round(closed_wall_clock(run_dir)["wall_s"], 2)}


class _Trainers:
    """The live trainer processes, each in its own session (so a Ctrl-C at the terminal reaches only
    the sweep); stop() sends each one's process group SIGTERM and lets no new one start."""

    def __init__(self):
        self.lock, self.live, self.stopping = threading.Lock(), {}, False

    def start(self, command: list[str], **kwargs) -> subprocess.Popen | None:
        with self.lock:
            if self.stopping:
                return None
            process = subprocess.Popen(command, start_new_session=True, **kwargs)
            self.live[process.pid] = process
            return process

    def ended(self, process: subprocess.Popen) -> None:
        with self.lock:
            self.live.pop(process.pid, None)

    def stop(self) -> int:
        with self.lock:
            self.stopping, live = True, list(self.live)
        for pid in live:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
        return len(live)


def train_run(run: Run, base: str, sweep_dir: pathlib.Path, trainers: _Trainers | None = None) -> dict | None:
    """Train one run in its own process (log in <run dir>/train.log); returns its record, or None
    when `trainers` is stopping. The trainer gets SIGTERM if the sweep dies (HYBRAX_PARENT_PID,
    hybrax.train.termination.follow_parent): it saves a checkpoint and exits."""
    run_dir = sweep_dir / "runs" / run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    trainers = trainers or _Trainers()
    start_invocation(run_dir)
    start = time.perf_counter()
    process = None
    try:
        with open(run_dir / "train.log", "a") as log:
            process = trainers.start([sys.executable, "-m", "hybrax.train", "--config", base, "--run-dir",
                                      str(run_dir), *run.overrides], stdout=log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", PARENT_ENV: str(os.getpid())})
            code = process.wait() if process else None
    finally:
        if process:
            trainers.ended(process)
        end_invocation(run_dir, time.perf_counter() - start)
    if code is None:
        return None
    if code != 0:
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"failed with exit status {code}"
        raise RuntimeError(f"run {run.name} {how}; see {run_dir / 'train.log'}")
    return record(run, run_dir)


def _raise_interrupted(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def run_sweep(path: str | pathlib.Path, out: str | pathlib.Path | None = None, *, jobs: int = 1,
              progress: bool = True) -> pathlib.Path:
    """Run every incomplete run of the sweep file; returns the sweep directory. On SIGTERM (when
    called from the main thread) or KeyboardInterrupt, the running trainers get SIGTERM, save a
    checkpoint and exit, and then Interrupted is raised."""
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM)
    if main_thread:
        signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        return _run_sweep(path, out, jobs, progress)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _run_sweep(path: str | pathlib.Path, out: str | pathlib.Path | None, jobs: int, progress: bool) -> pathlib.Path:
    tree, runs = load_sweep(path)
    sweep_dir = sweep_dir_of(tree, path, out)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / "sweep.yaml").write_text(find_sweep(path).read_text())
    done = completed(sweep_dir)
    todo = [r for r in runs if r.name not in done]
    bar = tqdm(total=len(runs), initial=len(runs) - len(todo), desc=f"sweep {sweep_dir.name}", unit="run",
               disable=not progress, dynamic_ncols=True)
    bar.set_postfix_str(f"{len(todo)} to run")
    lock, trainers = threading.Lock(), _Trainers()
    failures = []

    def one(run: Run) -> None:
        try:
            result = train_run(run, tree["base"], sweep_dir, trainers)
        except RuntimeError as e:
            failures.append(str(e))
            return
        if result is None:
            return
        with lock, open(sweep_dir / "results.jsonl", "a") as f:
            f.write(json.dumps(result) + "\n")   # one write, so a kill leaves at most one partial last line
            f.flush()
            os.fsync(f.fileno())
            bar.update(1)
            bar.set_postfix_str(f"{run.name}: val_loss {result['val_loss']:.4f}")

    pool = ThreadPoolExecutor(max_workers=max(1, jobs))
    try:
        list(pool.map(one, todo))
    except (KeyboardInterrupt, Interrupted) as e:
        name = e.signal_name if isinstance(e, Interrupted) else "SIGINT"
        stopped = trainers.stop()
        try:
            pool.shutdown(wait=True, cancel_futures=True)   # each stopped trainer saves a checkpoint first
        except (KeyboardInterrupt, Interrupted):
            raise Interrupted(name, stopped, waited=False) from None
        raise Interrupted(name, stopped) from None
    finally:
        pool.shutdown(wait=False)
        bar.close()
    if failures:
        raise RuntimeError(f"{len(failures)} of {len(todo)} runs did not finish; first: {failures[0]}")
    return sweep_dir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="hybrax-sweep", description="Run a grid of training runs.")
    p.add_argument("sweep", help="sweep file, or a shipped sweep's name: tiny, tiny_isoflop")
    p.add_argument("--out", default=None, help="sweep directory (default: ./runs/sweeps/<name>)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time, as separate processes (default 1)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their status; train nothing")
    args = p.parse_args(argv)
    try:
        if args.dry_run:
            tree, runs = load_sweep(args.sweep)
            done = completed(sweep_dir_of(tree, args.sweep, args.out), repair=False)
            for run in runs:
                c = run.config
                tokens = c.train.steps * c.data.batch_size * c.data.seq_len
                print(f"{'done' if run.name in done else 'todo':4} {run.name:32} params {c.model.num_params():>10,} "
                      f"steps {c.train.steps:>6,} tokens {tokens:>12,} "
                      f"flops {3 * c.model.flops_per_token(c.data.seq_len) * tokens:.3g}")
            return 0
        sweep_dir = run_sweep(args.sweep, args.out, jobs=args.jobs)
    except (SweepError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Interrupted) as e:
        e = e if isinstance(e, Interrupted) else Interrupted("SIGINT")
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        if not e.waited:   # the pool's threads still wait on the trainers, which stop on their own
            os._exit(e.exit_code)
        return e.exit_code
    print(f"results: {sweep_dir / 'results.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
