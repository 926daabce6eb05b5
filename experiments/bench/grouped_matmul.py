"""Time grouped_matmul (xla, ragged_dot) against one dense matmul with the same FLOPs.

    python experiments/bench/grouped_matmul.py [--rows 8192 16384] [--k 256] [--n 256 1024]
        [--groups 8 64] [--loads balanced random] [--implementations xla ragged_dot] [--repeats 3]

Each shape is lhs [M, K] x rhs [G, K, N], float32, on the default backend. Loads: `balanced`
(every group M / G rows), `random` (each row's group drawn uniformly: multinomial sizes, the load
of a router at initialisation). Baseline: `x @ w` with x [M, K], w [K, N] (the same FLOPs, one
matmul), timed again for every row in rounds alternating with the row's implementation, so both
see the same load of the shared machine. Each row times one jitted forward and one jitted
value-and-grad of sum(out * cotangent) with respect to lhs and rhs; compilation and a warm-up run
before each timed run are excluded and the best of `--repeats` rounds is reported. ragged_dot does G times the work
on CPU whatever the load; it runs for balanced loads only, and is skipped where that work is over
`--ragged-dot-max-gflop` GFLOP per forward.
"""

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from hybrax.experiments.bench.timing import best_time  # noqa: E402
from hybrax.pallas_kernels.grouped_matmul import grouped_matmul  # noqa: E402


def group_sizes(M: int, G: int, load: str, seed: int = 0) -> jnp.ndarray:
    if load == "balanced":
        sizes = np.full(G, M // G) + (np.arange(G) < M % G)
    else:
        sizes = np.random.default_rng(seed).multinomial(M, np.full(G, 1 / G))
    return jnp.asarray(sizes, jnp.int32)


def programs(product):
    """(forward, forward+backward) jitted for product(lhs, rhs) -> out."""
    loss = lambda lhs, rhs, cotangent: jnp.sum(product(lhs, rhs) * cotangent)
    return jax.jit(product), jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def timed_against(dense, product, lhs, w, rhs, cotangent, repeats):
    """Best (forward, forward+backward) seconds of dense(lhs, w) and of product(lhs, rhs), taken in
    alternating rounds so that both see the same load of the shared machine."""
    pairs = [(programs(dense), w), (programs(product), rhs)]
    best = [[float("inf")] * 2 for _ in pairs]
    for _ in range(repeats):
        for times, ((forward, forward_backward), weight) in zip(best, pairs):
            times[0] = min(times[0], best_time(forward, (lhs, weight), 1))
            times[1] = min(times[1], best_time(forward_backward, (lhs, weight, cotangent), 1))
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[8192, 16384])
    p.add_argument("--k", type=int, default=256)
    p.add_argument("--n", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--groups", type=int, nargs="+", default=[8, 64])
    p.add_argument("--loads", nargs="+", default=["balanced", "random"], choices=["balanced", "random"])
    p.add_argument("--implementations", nargs="+", default=["xla", "ragged_dot"])
    p.add_argument("--ragged-dot-max-gflop", type=float, default=100.0)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    K = args.k

    print(f"grouped_matmul vs dense x @ w (same FLOPs), float32, backend {jax.default_backend()}, "
          f"best of {args.repeats}")
    print()
    print("| implementation | load | M | K | N | G | fwd ms | fwd+bwd ms | dense fwd ms | dense fwd+bwd ms | "
          "fwd vs dense | fwd+bwd vs dense |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for M in args.rows:
        for N in args.n:
            keys = jax.random.split(jax.random.key(M + N), 3)
            lhs = jax.random.normal(keys[0], (M, K), jnp.float32)
            cotangent = jax.random.normal(keys[2], (M, N), jnp.float32)
            w = jax.random.normal(keys[1], (K, N), jnp.float32)
            for G in args.groups:
                rhs = jax.random.normal(keys[1], (G, K, N), jnp.float32) / np.sqrt(K)
                for load in args.loads:
                    sizes = group_sizes(M, G, load)
                    for impl in args.implementations:
                        if impl == "ragged_dot" and load != "balanced":
                            continue   # masked dense over all groups: the load does not matter
                        if impl == "ragged_dot" and 2 * M * K * N * G / 1e9 > args.ragged_dot_max_gflop:
                            print(f"| {impl} | {load} | {M} | {K} | {N} | {G} | skipped | skipped | - | - | - | - |")
                            continue
                        product = lambda x, w, sizes=sizes, impl=impl: grouped_matmul(x, w, sizes, implementation=impl)
                        dense, s = timed_against(lambda x, w: x @ w, product, lhs, w, rhs, cotangent, args.repeats)
                        print(f"| {impl} | {load} | {M} | {K} | {N} | {G} | {1e3 * s[0]:.2f} | {1e3 * s[1]:.2f} | "
                              f"{1e3 * dense[0]:.2f} | {1e3 * dense[1]:.2f} | {s[0] / dense[0]:.2f}x | "
                              f"{s[1] / dense[1]:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
