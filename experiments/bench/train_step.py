"""Time the jitted training step of a preset and print tokens/s, TFLOP/s and MFU.

    python experiments/bench/train_step.py --config configs/quickstart.yaml [key=value ...]
    python experiments/bench/train_step.py --compare model.d_model=128 --compare model.d_model=384

Each `--compare` adds a row with extra overrides; ratios are against the first row (the preset
as given), timed in the same process. Batches are real packed rows of the configured corpus.
"""

import argparse
import pathlib
import sys
import time

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from hybrax.train.config import load_config  # noqa: E402
from hybrax.train.data import build_datasets  # noqa: E402
from hybrax.train.hardware import peak_flops_per_device  # noqa: E402
from hybrax.train.optim import learning_rate_schedule, make_optimizer  # noqa: E402
from hybrax.train.step import create_model, init_state, make_train_step  # noqa: E402


def time_step(config, steps: int, warmup: int) -> dict:
    data = build_datasets(config.data, config.train.seed)
    optimizer = make_optimizer(config.optim, config.train.steps)
    graphdef, state = init_state(create_model(config.model, config.train.seed), optimizer)
    step_fn = make_train_step(graphdef, optimizer, learning_rate_schedule(config.optim, config.train.steps),
                              config.train.grad_accum)
    batches = [next(data.train) for _ in range(warmup + steps)]
    t = time.perf_counter()
    state, m = step_fn(state, batches[0])
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t
    for b in batches[1:warmup]:
        state, m = step_fn(state, b)
    jax.block_until_ready(m)
    times = []
    for b in batches[warmup:]:
        t = time.perf_counter()
        state, m = step_fn(state, b)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    tokens = config.data.batch_size * config.data.seq_len
    step_s = float(np.median(times))
    flops = 3 * config.model.flops_per_token(config.data.seq_len)
    return {"params": config.model.num_params(), "step_s": step_s, "tokens_per_s": tokens / step_s,
            "tflops": tokens / step_s * flops / 1e12, "compile_s": compile_s}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/quickstart.yaml")
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compare", action="append", default=[], help="extra overrides for another row")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    peak, source = peak_flops_per_device(load_config(args.config, args.overrides).model.dtype)
    peak *= jax.device_count()
    rows = [("preset", [])] + [(c, c.split()) for c in args.compare]
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; peak {peak / 1e12:.3f} TFLOP/s ({source})")
    print(f"{'variant':<40} {'params':>10} {'step ms':>9} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'vs preset':>9}")
    base = None
    for name, extra in rows:
        config = load_config(args.config, args.overrides + extra)
        r = time_step(config, args.steps, args.warmup)
        base = base or r["tokens_per_s"]
        print(f"{name:<40} {r['params']:>10,} {1e3 * r['step_s']:>9.1f} {r['tokens_per_s']:>10,.0f} "
              f"{r['tflops']:>8.3f} {100 * r['tflops'] * 1e12 / peak:>5.1f}% {r['tokens_per_s'] / base:>8.2f}x",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
