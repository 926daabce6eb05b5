"""The one device check: on a GPU or TPU, every Pallas kernel's test cases, the kernel benchmarks
against their baselines, and a short training run with Pallas kernels against xla kernels.

    PYTHONPATH=. python3 experiments/bench/device_check.py [--out device_check.json]
    python experiments/bench/device_check.py --dry-run      # a tiny version of each section, CPU too

Sections (each bounded by its share of `--budget-s`, 450 s by default, so the whole check ends
inside 8 minutes on one H100; whatever runs out of time says so in the results):

1. tests: `pytest tests/pallas_kernels/<file> -m "not tpu_compile"` per file, in a subprocess
   (on a GPU the `pallas_gpu` kernels then run compiled, not interpreted). Every test's outcome is
   read from pytest's junit XML and counted per (op, implementation): passed, refused (a refusal
   on purpose that the test asserted, e.g. pallas_tpu on a GPU; not evidence that it works),
   failed, error, skipped. An implementation all of whose cases passed here is a candidate for a
   row of pallas_kernels/verified.py (added by hand, citing this file).
2. benchmarks: device_bench.py (linear_attention with flash-linear-attention when importable,
   block_sparse_attention, dot_product_attention, grouped_matmul), ratios against the baseline of
   the same run.
3. training: configs/hybrid_gla.yaml for `--train-steps` (50) steps twice, with the Pallas kernels
   (model.kernels.linear_attention=pallas_gpu, and attention=pallas_gpu where it takes the step's
   packed segment ids, else xla; pallas_tpu and splash on a TPU) and with xla everywhere, both
   strict (a refusal is an error); losses compared step by step from metrics.jsonl.

Writes one JSON file (`--out`) with the device, versions, date and the three sections, and prints
the tables. It changes nothing else. Exit status: 0 all tests passed and every section ran, 1
otherwise, 2 on a CPU without --dry-run.
"""

import argparse
import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
# This process and its pytest / training subprocesses share one accelerator: none may take 75% of
# its memory up front (jax's default), or the next one to start finds none left.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402

from hybrax.experiments.bench.device_bench import FULL, TINY, pallas_name, run_benchmarks  # noqa: E402
from hybrax.pallas_kernels.implementation import current_backend  # noqa: E402

REFUSED_MARK = "refused on purpose:"    # printed by tests/pallas_kernels/refusals.py
TEST_FILE_OPS = {"flash_attention": "dot_product_attention"}   # test file stem -> op, where they differ
PACKAGES = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "libtpu", "flax", "optax", "orbax-checkpoint",
            "pydantic", "numpy", "torch", "triton", "fla-core")
# A tiny model for --dry-run: one GLA and one attention layer at toy width.
TINY_TRAIN = ["model.d_model=32", "model.num_heads=2", "model.num_layers=2", "model.mixers=[gla,attention]",
              "data.seq_len=32", "data.batch_size=4"]
# The dry run's tests: a few fast cases per kind of outcome (xla, ragged_dot, a pallas_tpu refusal test).
TINY_TESTS = {"test_grouped_matmul.py": "uneven-fp32 and not pallas_tpu or test_pallas_tpu_refuses_float16"}


def environment() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {"backend": current_backend(), "device_kind": jax.devices()[0].device_kind,
            "device_count": jax.device_count(), "python": platform.python_version(), "versions": versions,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def subprocess_env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def run_bounded(command: list[str], log_path: pathlib.Path, timeout: float) -> tuple[int | None, float]:
    """(exit code, or None if killed at `timeout` seconds; wall seconds), output to log_path."""
    start = time.monotonic()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=subprocess_env(), stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = process.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()
            code = None
    return code, time.monotonic() - start


# --- 1. tests ----------------------------------------------------------------------------------

def implementation_of(op: str, file_stem: str, test_name: str, names: list[str]) -> str:
    """Which implementation a test checks: a name in its parameters, else in its function name,
    else the kernel its name or file is about (tpu / gpu / triton); "op" for op-wide tests (laws of
    the reference, input errors, the switch)."""
    function, _, params = test_name.partition("[")
    for token in re.split(r"[-\[\],]", params):
        if token in names:
            return token
    for name in sorted(names, key=len, reverse=True):
        if re.search(rf"(^|_){name}(_|$)", function):
            return name
    for hint, name in (("tpu", "pallas_tpu"), ("gpu", "pallas_gpu"), ("triton", "pallas_gpu")):
        if hint in function.split("_") and name in names:
            return name
    for suffix, name in (("_gpu", "pallas_gpu"), ("_pallas", "pallas_tpu")):
        if file_stem.endswith(suffix) and name in names:
            return name
    return "op"


def op_of(file_stem: str) -> str:
    stem = file_stem.removeprefix("test_")
    for suffix in ("_pallas", "_gpu"):
        stem = stem.removesuffix(suffix)
    return TEST_FILE_OPS.get(stem, stem)


def implementation_names(op: str) -> list[str]:
    try:
        module = __import__(f"hybrax.pallas_kernels.{op}.api", fromlist=["IMPLEMENTATIONS"])
        return list(module.IMPLEMENTATIONS)
    except ImportError:
        return []


def outcomes_from_junit(path: pathlib.Path) -> dict[str, tuple[str, str]]:
    """{test name: (outcome, first line of the message)} from a junit XML file."""
    results = {}
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        name, outcome, message = case.get("name"), "passed", ""
        for tag in ("failure", "error", "skipped"):
            element = case.find(tag)
            if element is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                message = (element.get("message") or element.text or "").strip().splitlines()[:1]
                message = message[0][:300] if message else ""
                break
        out = case.find("system-out")
        if outcome == "passed" and out is not None and REFUSED_MARK in (out.text or ""):
            outcome = "refused"
            message = next(line for line in out.text.splitlines() if REFUSED_MARK in line).strip()
        results[name] = (outcome, message)
    return results


def outcomes_from_log(path: pathlib.Path, file_name: str) -> dict[str, tuple[str, str]]:
    """What `pytest -v` printed before it was stopped (no junit XML then; refusals read as passes)."""
    results = {}
    for line in path.read_text(errors="replace").splitlines():
        match = re.match(rf"\S*{re.escape(file_name)}::(\S+) (PASSED|FAILED|ERROR|SKIPPED)", line)
        if match:
            results[match.group(1)] = ({"ERROR": "error"}.get(match.group(2), match.group(2).lower()), "")
    return results


def run_kernel_tests(files: dict[str, str | None], markers: str, deadline: float, work: pathlib.Path,
                     log=print) -> dict:
    """Run each test file in its own pytest, each with an even share of the time left (what one
    leaves over goes to the rest); count outcomes per (op, implementation)."""
    per_test, per_file = [], {}
    for index, (file_name, keyword) in enumerate(files.items()):
        stem = pathlib.Path(file_name).stem
        remaining = deadline - time.monotonic()
        if remaining < 5:
            per_file[file_name] = {"status": "not run: out of time"}
            continue
        share = remaining / (len(files) - index)
        junit, log_path = work / f"{stem}.xml", work / f"{stem}.log"
        command = [sys.executable, "-m", "pytest", f"tests/pallas_kernels/{file_name}", "-v", "-m", markers,
                   "-p", "no:cacheprovider", f"--junitxml={junit}", "-o", "junit_logging=system-out"]
        command += ["-k", keyword] if keyword else []
        code, seconds = run_bounded(command, log_path, share)
        status = "timed out" if code is None else {0: "passed", 1: "failures", 5: "no tests selected"}.get(
            code, f"pytest exit {code}")
        results = outcomes_from_junit(junit) if junit.exists() else outcomes_from_log(log_path, file_name)
        if code not in (0, 1, 5, None) and not results:
            status += ": " + " | ".join(log_path.read_text(errors="replace").strip().splitlines()[-3:])[:500]
        per_file[file_name] = {"status": status, "seconds": round(seconds, 1), "tests": len(results)}
        op = op_of(stem)
        names = implementation_names(op)
        for name, (outcome, message) in results.items():
            per_test.append({"op": op, "implementation": implementation_of(op, stem, name, names),
                             "test": f"{file_name}::{name}", "outcome": outcome, "message": message})
        log(f"tests {file_name}: {status}, {len(results)} tests in {seconds:.0f} s")
    summary: dict[str, dict[str, dict]] = {}
    for record in per_test:
        counts = summary.setdefault(record["op"], {}).setdefault(
            record["implementation"], {k: 0 for k in ("passed", "refused", "failed", "error", "skipped")})
        counts[record["outcome"]] += 1
    for implementations in summary.values():
        for counts in implementations.values():
            counts["all_passed"] = counts["passed"] > 0 and counts["failed"] == counts["error"] == 0
    return {"markers": markers, "files": per_file, "summary": summary, "tests": per_test}


def tests_table(section: dict) -> str:
    lines = [f"kernel tests on {current_backend()} (-m \"{section['markers']}\")", "",
             "| op | implementation | passed | refused on purpose | failed | error | skipped | all passed |",
             "|---|---|---|---|---|---|---|---|"]
    for op, implementations in sorted(section["summary"].items()):
        for name, c in sorted(implementations.items()):
            lines.append(f"| {op} | {name} | {c['passed']} | {c['refused']} | {c['failed']} | {c['error']} | "
                         f"{c['skipped']} | {'yes' if c['all_passed'] else 'NO'} |")
    bad = [t for t in section["tests"] if t["outcome"] in ("failed", "error")]
    lines += [f"- {t['outcome']}: {t['test']}: {t['message']}" for t in bad[:20]]
    lines += [f"- {file}: {info['status']}" for file, info in section["files"].items()
              if info["status"] not in ("passed", "failures")]
    return "\n".join(lines)


# --- 3. training -------------------------------------------------------------------------------

def attention_accepts(name: str) -> bool:
    """Whether dot_product_attention's `name` takes causal bf16 attention with segment ids here
    (what the training step asks of it), traced with abstract inputs only."""
    import jax.numpy as jnp

    from hybrax.pallas_kernels.dot_product_attention import dot_product_attention
    x = jax.ShapeDtypeStruct((1, 128, 2, 64), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((1, 128), jnp.int32)
    try:
        jax.eval_shape(lambda q, seg: dot_product_attention(q, q, q, segment_ids=seg, implementation=name), x, seg)
    except (NotImplementedError, ValueError):
        return False
    return True


def kernel_overrides() -> dict[str, list[str]]:
    """The two runs: the backend's Pallas kernels (dense attention: the Pallas kernel where it takes
    segment ids, else xla), and xla everywhere; both strict."""
    wanted = "splash" if current_backend() == "tpu" else "pallas_gpu"
    registered = wanted in implementation_names("dot_product_attention")
    attention = wanted if registered and attention_accepts(wanted) else "xla"
    return {"pallas": [f"model.kernels.linear_attention={pallas_name()}", f"model.kernels.attention={attention}",
                       "model.kernels.strict=true"],
            "xla": ["model.kernels.linear_attention=xla", "model.kernels.attention=xla", "model.kernels.strict=true"]}


def read_losses(run_dir: pathlib.Path) -> tuple[dict[int, float], list[float]]:
    """({step: training loss}, [tokens/s of each logged step]) from metrics.jsonl."""
    losses, rates = {}, []
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        record = json.loads(line)
        if "loss" in record and "val_loss" not in record:
            losses[int(record["step"])] = float(record["loss"])
            rates.append(float(record.get("tokens_per_s", 0.0)))
    return losses, rates


def run_training(config: str, steps: int, extra: list[str], deadline: float, work: pathlib.Path, log=print) -> dict:
    common = [f"train.steps={steps}", "train.log_every=1", f"train.eval_every={steps}", "train.eval_batches=2",
              "log.progress_bar=false", "log.sample_tokens=0", "log.tensorboard=false", f"checkpoint.every={steps}"]
    runs = {}
    overrides = kernel_overrides()
    for index, (label, kernels) in enumerate(overrides.items()):
        run_dir = work / f"train_{label}"
        command = [sys.executable, "-m", "hybrax.train", "--config", config, "--run-dir", str(run_dir),
                   *common, *extra, *kernels]
        share = (deadline - time.monotonic()) / (len(overrides) - index)   # split what is left evenly
        code, seconds = run_bounded(command, work / f"train_{label}.log", share)
        output = (work / f"train_{label}.log").read_text(errors="replace")
        losses, rates = read_losses(run_dir)
        runs[label] = {"command": " ".join(command[1:]), "exit": code, "seconds": round(seconds, 1),
                       "kernels": [line.removeprefix("kernel ") for line in output.splitlines()
                                   if line.startswith("kernel ")],
                       "losses": [losses[s] for s in sorted(losses)],
                       "tokens_per_s_median": statistics.median(rates[1:]) if len(rates) > 1 else None}
        if code != 0:
            runs[label]["error"] = ("timed out" if code is None else
                                    " | ".join(output.strip().splitlines()[-3:])[:500])
        log(f"training {label}: exit {code}, {len(losses)} steps in {seconds:.0f} s")
    a, b = runs["pallas"]["losses"], runs["xla"]["losses"]
    comparison = {"steps_compared": min(len(a), len(b))}
    if a and b:
        diffs = [abs(x - y) for x, y in zip(a, b)]
        worst = max(range(len(diffs)), key=diffs.__getitem__)
        comparison.update(first_step_abs_diff=diffs[0], max_abs_diff=diffs[worst], max_abs_diff_step=worst + 1,
                          final_loss_pallas=a[-1], final_loss_xla=b[-1])
        if runs["pallas"]["tokens_per_s_median"] and runs["xla"]["tokens_per_s_median"]:
            comparison["speed_pallas_vs_xla"] = (runs["pallas"]["tokens_per_s_median"]
                                                 / runs["xla"]["tokens_per_s_median"])
    return {"config": config, "steps": steps, "runs": runs, "comparison": comparison}


def training_table(section: dict) -> str:
    c, runs = section["comparison"], section["runs"]
    lines = [f"training {section['config']}, {section['steps']} steps: Pallas kernels vs xla", "",
             "| run | exit | steps logged | final loss | median tokens/s | kernels |", "|---|---|---|---|---|---|"]
    for label, run in runs.items():
        final = f"{run['losses'][-1]:.4f}" if run["losses"] else "-"
        rate = f"{run['tokens_per_s_median']:,.0f}" if run["tokens_per_s_median"] else "-"
        lines.append(f"| {label} | {run['exit']} | {len(run['losses'])} | {final} | {rate} | "
                     f"{'; '.join(run['kernels']) or run.get('error', '-')} |")
    if "max_abs_diff" in c:
        lines.append(f"\nloss |pallas - xla|: step 1 {c['first_step_abs_diff']:.2e}, max {c['max_abs_diff']:.2e} "
                     f"(step {c['max_abs_diff_step']}) over {c['steps_compared']} steps; speed pallas / xla "
                     f"{c.get('speed_pallas_vs_xla', float('nan')):.2f}x")
    return "\n".join(lines)


# --- main --------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="device_check.json", help="the results file (JSON)")
    p.add_argument("--dry-run", "--allow-cpu", action="store_true",
                   help="a tiny version of each section, on any backend (CPU included): checks the script")
    p.add_argument("--sections", nargs="+", default=["tests", "benchmarks", "training"],
                   choices=["tests", "benchmarks", "training"])
    p.add_argument("--markers", default="not tpu_compile", help="pytest -m expression for the kernel tests")
    p.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget of the whole check")
    p.add_argument("--config", default="configs/hybrid_gla.yaml")
    p.add_argument("--train-steps", type=int, default=50)
    args = p.parse_args(argv)

    if current_backend() == "cpu" and not args.dry_run:
        print(f"device_check.py needs a GPU or TPU: the jax backend is cpu ({jax.devices()[0].device_kind}); "
              "--dry-run runs a tiny version on the CPU", file=sys.stderr)
        return 2
    start = time.monotonic()
    # shares of the budget: tests 50%, benchmarks 20%, training the rest (each gets what is left over)
    shares = {"tests": 0.5, "benchmarks": 0.7, "training": 1.0}
    deadline = lambda section: start + shares[section] * args.budget_s  # noqa: E731
    results = {"environment": environment(), "dry_run": args.dry_run, "budget_s": args.budget_s}
    print(f"device check on {results['environment']['device_kind']} ({current_backend()}), "
          f"jax {jax.__version__}{', dry run' if args.dry_run else ''}")
    ok, seconds = True, {}
    with tempfile.TemporaryDirectory(prefix="device_check_") as tmp:
        work = pathlib.Path(tmp)
        section_start = time.monotonic()
        if "tests" in args.sections:
            files = TINY_TESTS if args.dry_run else {
                f.name: None for f in sorted((ROOT / "tests" / "pallas_kernels").glob("test_*.py"))}
            section = run_kernel_tests(files, args.markers, deadline("tests"), work)
            results["tests"] = section
            print("\n" + tests_table(section) + "\n")
            ok &= all(c["failed"] == c["error"] == 0 for impls in section["summary"].values() for c in impls.values())
            ok &= all(info["status"] in ("passed", "no tests selected") for info in section["files"].values())
            seconds["tests"], section_start = round(time.monotonic() - section_start, 1), time.monotonic()
        if "benchmarks" in args.sections:
            results["benchmarks"] = run_benchmarks(TINY if args.dry_run else FULL, deadline("benchmarks"))
            ok &= not any("error" in table for table in results["benchmarks"].values())
            seconds["benchmarks"], section_start = round(time.monotonic() - section_start, 1), time.monotonic()
        if "training" in args.sections:
            steps = min(args.train_steps, 3) if args.dry_run else args.train_steps
            section = run_training(args.config, steps, TINY_TRAIN if args.dry_run else [], deadline("training"), work)
            results["training"] = section
            print("\n" + training_table(section) + "\n")
            ok &= all(run["exit"] == 0 for run in section["runs"].values())
            seconds["training"] = round(time.monotonic() - section_start, 1)
    results["seconds"] = {**seconds, "total": round(time.monotonic() - start, 1)}
    pathlib.Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    verdict = "" if ok else "; some checks failed or did not run"
    print(f"wrote {args.out} ({results['seconds']['total']:.0f} s){verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
