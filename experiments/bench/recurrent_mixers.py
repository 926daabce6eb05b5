"""Time forward + backward of the xLSTM and Gated DeltaNet ops: mlstm and delta_rule (chunked) against
their reference scans and across lengths, slstm (strictly sequential) against a naive scan.

    python experiments/bench/recurrent_mixers.py [--lengths 1024 2048 4096 8192 16384]
        [--reference-max 4096] [--slstm-length 2048] [--slstm-batch 8] [--repeats 3]

Rows per length T (B=1, H=4, K=V=64, float32, chunk 64, on the default backend): `mlstm` xla and
reference, `delta_rule` xla and reference (L2-normalised keys, beta in (0, 1), Mamba-2-like
decays), each one jitted value-and-grad of sum(o * w) with respect to every input (q, k, v, the
gates); compilation and one warm-up run excluded, the best of `--repeats` reported. Then sLSTM at
one length (B=8, H=4, D=64): tokens/s of the xla scan (fused recurrent matmul, its own backward)
against the reference scan of the cell run in float32 (a naive lax.scan, autodiff backward), forward
only and forward + backward. The acceptance lines are those of the issue: flat time per token for
the chunked xla paths (t(16k)/16k within 1.3x of t(2k)/2k) and xla >= 5x faster than the reference
scans at T = 4k.
"""

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from hybrax.experiments.bench.timing import best_time  # noqa: E402
from hybrax.pallas_kernels.delta_rule import delta_rule  # noqa: E402
from hybrax.pallas_kernels.mlstm import mlstm  # noqa: E402
from hybrax.pallas_kernels.slstm import slstm  # noqa: E402


def chunked_inputs(op: str, T: int, B: int, H: int, D: int):
    keys = jax.random.split(jax.random.key(T), 6)
    q, k, v, w = (jax.random.normal(key, (B, T, H, D), jnp.float32) for key in keys[:4])
    if op == "mlstm":
        li = 3.0 * jax.random.normal(keys[4], (B, T, H))
        lf = jax.nn.log_sigmoid(jax.random.normal(keys[5], (B, T, H)) + 4.0)
        return (q, k, v, li, lf), w
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    beta = jax.nn.sigmoid(jax.random.normal(keys[4], (B, T, H)))
    g = -0.1 * jax.nn.softplus(jax.random.normal(keys[5], (B, T, H)))
    return (unit(q), unit(k), v, beta, g), w


def chunked_step(op: str, implementation: str, num_inputs: int):
    function = mlstm if op == "mlstm" else delta_rule

    def loss(*args):
        *inputs, w = args
        o, _ = function(*inputs, implementation=implementation)
        return jnp.sum(o * w)
    return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(num_inputs))))


def slstm_inputs(T: int, B: int, H: int, D: int):
    keys = jax.random.split(jax.random.key(T), 3)
    gates = jax.random.normal(keys[0], (B, T, H, 4, D), jnp.float32)
    weights = D ** -0.5 * jax.random.normal(keys[1], (H, D, 4, D), jnp.float32)
    return gates, weights, jax.random.normal(keys[2], (B, T, H, D), jnp.float32)


def slstm_step(implementation: str, backward: bool):
    def loss(gates, weights, w):
        h, _ = slstm(gates, weights, implementation=implementation)
        return jnp.sum(h * w)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)) if backward else loss)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--reference-max", type=int, default=4096, help="skip the reference scans above this T")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--slstm-length", type=int, default=2048)
    p.add_argument("--slstm-batch", type=int, default=8)
    args = p.parse_args(argv)
    B, H, D = 1, args.heads, args.head_dim

    print(f"mlstm / delta_rule forward+backward, B={B} H={H} K=V={D} float32, chunk 64, "
          f"backend {jax.default_backend()}, best of {args.repeats}")
    print(f"{'T':>6} | {'row':<22} | {'time ms':>9} | {'us/token':>8} | {'/ xla':>7}")
    print("-" * 66)
    seconds = {}
    for T in args.lengths:
        for op in ("mlstm", "delta_rule"):
            for implementation in ("xla", "reference"):
                label = f"{op} {implementation}"
                if implementation == "reference" and T > args.reference_max:
                    print(f"{T:>6} | {label:<22} | {'skipped':>9} | {'':>8} | (T > {args.reference_max})")
                    continue
                inputs, w = chunked_inputs(op, T, B, H, D)
                seconds[op, implementation, T] = best_time(chunked_step(op, implementation, len(inputs)),
                                                           (*inputs, w), args.repeats)
                ratio = seconds[op, implementation, T] / seconds[op, "xla", T]
                print(f"{T:>6} | {label:<22} | {1e3 * seconds[op, implementation, T]:>9.1f} | "
                      f"{1e6 * seconds[op, implementation, T] / T:>8.2f} | {ratio:>6.2f}x", flush=True)

    T, Bs = args.slstm_length, args.slstm_batch
    print(f"\nslstm at T={T}, B={Bs}, H={H}, D={D} float32: tokens/s (higher is better)")
    print(f"{'row':<44} | {'forward':>10} | {'fwd+bwd':>10}")
    print("-" * 70)
    gates, weights, w = slstm_inputs(T, Bs, H, D)
    rates = {}
    for implementation, label in (("xla", "xla (fused step, own backward)"),
                                  ("reference", "naive lax.scan of the cell (float32)")):
        row = [Bs * T / best_time(slstm_step(implementation, backward), (gates, weights, w), args.repeats)
               for backward in (False, True)]
        rates[implementation] = row
        print(f"{label:<44} | {row[0]:>10,.0f} | {row[1]:>10,.0f}", flush=True)

    print()
    lo, hi = 2048, max(args.lengths)
    for op in ("mlstm", "delta_rule"):
        if (op, "xla", lo) in seconds and (op, "xla", hi) in seconds and hi > lo:
            growth = (seconds[op, "xla", hi] / hi) / (seconds[op, "xla", lo] / lo)
            print(f"flat time per token, {op} xla: t({hi})/{hi} = {growth:.2f} x t({lo})/{lo} (need <= 1.3): "
                  f"{'ok' if growth <= 1.3 else 'FAIL'}")
        if (op, "reference", 4096) in seconds:
            speedup = seconds[op, "reference", 4096] / seconds[op, "xla", 4096]
            print(f"{op} xla vs reference at T=4096: {speedup:.1f}x faster (need >= 5x): "
                  f"{'ok' if speedup >= 5 else 'FAIL'}")
    print(f"slstm xla vs naive scan at T={T}: forward {rates['xla'][0] / rates['reference'][0]:.1f}x, "
          f"forward+backward {rates['xla'][1] / rates['reference'][1]:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
