"""Time forward + backward of linear_attention against causal softmax attention and the scan.

    python experiments/bench/linear_attention.py [--lengths 1024 2048 4096 8192 16384]
        [--softmax-max 8192] [--reference-max 4096] [--repeats 3] [--chunk-size 64]

Rows per length T (B=1, H=4, K=V=64 by default, float32, on the default backend):
`xla` with per-channel gates ([B, T, H, K], GLA) and with scalar gates ([B, T, H]), causal
`jax.nn.dot_product_attention`, and the `reference` lax.scan with per-channel gates. Each is one
jitted value-and-grad of sum(o * w) with respect to q, k, v (and log_decay); compilation and one
warm-up run are excluded and the best of `--repeats` runs is reported (best, not median, because
the machine may be shared). Baselines whose cost grows fastest are skipped above a length (said so
in the table). Ratios are taken in the same run. The acceptance lines at the end are those of the
issue: flat time per token for xla (t(16k)/16k within 1.3x of t(2k)/2k) and, with per-channel
gates, xla >= 10x faster than causal softmax at T=4k and than the reference at T=2k.
"""

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from hybrax.pallas_kernels.linear_attention import linear_attention  # noqa: E402
from hybrax.experiments.bench.timing import best_time  # noqa: E402


def make_inputs(T: int, B: int, H: int, D: int, gates: str | None):
    keys = jax.random.split(jax.random.key(T), 5)
    q, k, v = (jax.random.normal(key, (B, T, H, D), jnp.float32) for key in keys[:3])
    g = None
    if gates is not None:
        shape = (B, T, H, D) if gates == "channel" else (B, T, H)
        g = jax.nn.log_sigmoid(jax.random.normal(keys[3], shape) + 3.0)  # GLA-like gates near 1
    w = jax.random.normal(keys[4], (B, T, H, D), jnp.float32)
    return q, k, v, g, w


def forward_backward(row: str, chunk_size: int):
    """A jitted (q, k, v, g, w) -> (loss, grads) for one row of the table."""
    if row == "softmax":
        def loss(q, k, v, g, w):
            return jnp.sum(jax.nn.dot_product_attention(q, k, v, is_causal=True) * w)
    else:
        implementation = "reference" if row == "reference" else "xla"

        def loss(q, k, v, g, w):
            o, _ = linear_attention(q, k, v, g, chunk_size=chunk_size, implementation=implementation)
            return jnp.sum(o * w)
    argnums = (0, 1, 2) if row == "softmax" else (0, 1, 2, 3)  # linear attention: also d log_decay
    return jax.jit(jax.value_and_grad(loss, argnums=argnums))


ROWS = {  # row -> (gates, label)
    "xla_channel": ("channel", "xla, per-channel gates"),
    "xla_scalar": ("scalar", "xla, scalar gates"),
    "softmax": (None, "causal softmax (jax.nn.dot_product_attention)"),
    "reference": ("channel", "reference scan, per-channel gates"),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--softmax-max", type=int, default=8192, help="skip softmax above this T")
    p.add_argument("--reference-max", type=int, default=4096, help="skip the reference above this T")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    args = p.parse_args(argv)
    limits = {"softmax": args.softmax_max, "reference": args.reference_max}

    print(f"linear_attention forward+backward, B={args.batch} H={args.heads} K=V={args.head_dim} "
          f"float32, chunk {args.chunk_size}, backend {jax.default_backend()}, best of {args.repeats}")
    print(f"{'T':>6} | {'row':<46} | {'time ms':>9} | {'us/token':>8} | {'/ xla channel':>13}")
    print("-" * 96)
    seconds = {}
    for T in args.lengths:
        for row, (gates, label) in ROWS.items():
            if T > limits.get(row, T):
                print(f"{T:>6} | {label:<46} | {'skipped':>9} | {'':>8} | (T > {limits[row]})")
                continue
            q, k, v, g, w = make_inputs(T, args.batch, args.heads, args.head_dim, gates)
            seconds[row, T] = best_time(forward_backward(row, args.chunk_size), (q, k, v, g, w),
                                        args.repeats)
            ratio = seconds[row, T] / seconds["xla_channel", T]
            print(f"{T:>6} | {label:<46} | {1e3 * seconds[row, T]:>9.1f} | "
                  f"{1e6 * seconds[row, T] / T:>8.2f} | {ratio:>12.2f}x", flush=True)

    print()
    lo, hi = 2048, max(args.lengths)
    for row in ("xla_channel", "xla_scalar"):
        if (row, lo) in seconds and (row, hi) in seconds and hi > lo:
            growth = (seconds[row, hi] / hi) / (seconds[row, lo] / lo)
            verdict = "ok" if growth <= 1.3 else "FAIL"
            print(f"flat time per token, {row}: t({hi})/{hi} = {growth:.2f} x t({lo})/{lo} "
                  f"(need <= 1.3): {verdict}")
    for baseline, T in (("softmax", 4096), ("reference", 2048)):
        if (baseline, T) in seconds and ("xla_channel", T) in seconds:
            speedup = seconds[baseline, T] / seconds["xla_channel", T]
            verdict = "ok" if speedup >= 10 else "FAIL"
            print(f"xla per-channel vs {baseline} at T={T}: {speedup:.1f}x faster (need >= 10x): {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
