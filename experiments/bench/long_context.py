"""Long-context training with and without sequence parallelism: configs/long_context.yaml (16k-byte
rows, GLA x 3 + attention) trained for a few steps with the sequence split over `seq` devices
versus whole on one device. Prints a table: seconds per step (median of the steps after the first)
and XLA's per-device memory of the compiled step, with ratios against seq=1 from the same run.

    python experiments/bench/long_context.py [--seq 1 8] [--seq-len 16384] [--steps 4]

Each setting runs `hybrax-train` in a subprocess with that many fake CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=N). On a CPU the fake devices share the cores,
so the step time shows the cost of the split, not a speed-up; the memory per device is the point.
A setting that does not fit in host memory (killed) still reports XLA's memory plan, with its exit
status in place of the step time.
"""

import argparse
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile

MEMORY = re.compile(r"train step memory per device: peak ([\d,.]+) MiB")


def run(seq: int, seq_len: int, steps: int, extra: list[str]) -> dict:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={seq}", "JAX_PLATFORMS": "cpu"}
    with tempfile.TemporaryDirectory() as run_dir:
        out = subprocess.run([sys.executable, "-m", "hybrax.train", "--config", "long_context.yaml", "--run-dir",
                              run_dir, f"mesh.seq={seq}", f"data.seq_len={seq_len}", f"train.steps={steps}",
                              "log.progress_bar=false", "log.tensorboard=false", *extra],
                             env=env, capture_output=True, text=True)
        found = MEMORY.search(out.stdout)
        if found is None:
            raise SystemExit(f"seq={seq} failed before compiling:\n{out.stderr[-3000:]}")
        memory = float(found.group(1).replace(",", ""))
        if out.returncode != 0:   # e.g. killed for memory: XLA's plan is still the answer to "does it fit"
            return {"step_s": None, "memory_mib": memory, "loss": None, "exit": out.returncode}
        records = [json.loads(x) for x in (pathlib.Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]
    loss = [r["loss"] for r in records if "tokens_per_s" in r][-1]
    return {"step_s": seq_len / statistics.median(rates), "memory_mib": memory, "loss": loss, "exit": 0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, nargs="+", default=[1, 8])
    p.add_argument("--seq-len", type=int, default=16384)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("overrides", nargs="*", help="extra config overrides")
    args = p.parse_args()
    results = {seq: run(seq, args.seq_len, args.steps, args.overrides) for seq in args.seq}
    base = results[args.seq[0]]
    print(f"T = {args.seq_len}, batch 1, configs/long_context.yaml; ratios against seq={args.seq[0]}")
    print(f"{'seq':>4} | {'s/step':>8} | {'ratio':>6} | {'MiB/device':>11} | {'ratio':>6} | {'last loss':>9}")
    for seq, r in results.items():
        if r["step_s"] is None:
            step = f"{'exit ' + str(r['exit']):>8} | {'-':>6}"
        else:
            ratio = f"{r['step_s'] / base['step_s']:6.2f}" if base["step_s"] else f"{'-':>6}"
            step = f"{r['step_s']:8.2f} | {ratio}"
        loss = f"{r['loss']:9.4f}" if r["loss"] is not None else f"{'-':>9}"
        print(f"{seq:>4} | {step} | {r['memory_mib']:11,.1f} | {r['memory_mib'] / base['memory_mib']:6.3f} | {loss}")


if __name__ == "__main__":
    main()
