"""Time block_sparse_attention (xla path) against dense causal softmax attention.

    python experiments/bench/sparse_attention.py [--seq-len 8192] [--block 64]
        [--densities 0.03125 0.0625 0.125 0.25 0.5] [--repeats 3] [--implementation xla]

Shapes (defaults): B=1, H=Hkv=4, D=64, T=S=8192, blocks of 64 (nq = nk = 128), float32, on the
default backend. Block lists are what a causal selector produces: every query block n lists its
diagonal block n plus random earlier blocks, n_sel = round(density * (nk + 1) / 2) slots in all
(density = the fraction of the causal blocks, nk (nk + 1) / 2, that are read). Query blocks with
fewer than n_sel causal blocks list all of them and -1 for the rest.

Baseline: dense causal attention, `dot_product_attention(..., implementation="xla")`
(`jax.nn.dot_product_attention`), same shapes, same run. Each row times one jitted forward and one
jitted value-and-grad of sum(o * w) with respect to q, k, v; compilation and one warm-up run are
excluded and the best of `--repeats` runs is reported (best, not median: the machine is shared).
The acceptance lines at the end are the issue's: time falls with density, and at density 1/8 the
sparse op is >= 4x faster than dense causal attention.
"""

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from hybrax.pallas_kernels.block_sparse_attention import block_sparse_attention  # noqa: E402
from hybrax.pallas_kernels.dot_product_attention import dot_product_attention  # noqa: E402
from hybrax.experiments.bench.timing import best_time  # noqa: E402


def causal_block_lists(B: int, H: int, num_blocks: int, n_sel: int, seed: int = 0) -> np.ndarray:
    """int32 [B, H, nq, n_sel]: the diagonal block, then distinct random earlier blocks, then -1."""
    rng = np.random.default_rng(seed)
    out = np.full((B, H, num_blocks, n_sel), -1, np.int32)
    for b in range(B):
        for h in range(H):
            for n in range(num_blocks):
                count = min(n_sel, n + 1)
                out[b, h, n, 0] = n
                out[b, h, n, 1:count] = rng.choice(n, count - 1, replace=False)
    return out


def make_inputs(B: int, T: int, H: int, D: int):
    keys = jax.random.split(jax.random.key(T), 4)
    return tuple(jax.random.normal(key, (B, T, H, D), jnp.float32) for key in keys)  # q, k, v, w


def programs(attend):
    """(forward, forward+backward) jitted for one attention function (q, k, v) -> o."""
    forward = jax.jit(attend)
    loss = lambda q, k, v, w: jnp.sum(attend(q, k, v) * w)
    return forward, jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--densities", type=float, nargs="+", default=[1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--implementation", default="xla")
    args = p.parse_args(argv)
    B, T, H, D, block = args.batch, args.seq_len, args.heads, args.head_dim, args.block
    num_blocks = -(-T // block)
    q, k, v, w = make_inputs(B, T, H, D)

    print(f"block_sparse_attention ({args.implementation}) vs dense causal attention, B={B} H=Hkv={H} D={D} "
          f"T={T} block {block} (nq = nk = {num_blocks}), float32, backend {jax.default_backend()}, "
          f"best of {args.repeats}")
    print()
    print("| row | density | n_sel | forward ms | fwd speedup | fwd+bwd ms | fwd+bwd speedup |")
    print("|---|---|---|---|---|---|---|")
    dense = programs(lambda q, k, v: dot_product_attention(q, k, v, causal=True, implementation="xla"))
    dense_s = [best_time(dense[0], (q, k, v), args.repeats), best_time(dense[1], (q, k, v, w), args.repeats)]
    print(f"| dense causal (xla) | 1 | {num_blocks} | {1e3 * dense_s[0]:.1f} | 1.00x | {1e3 * dense_s[1]:.1f} | "
          f"1.00x |", flush=True)
    results = {}
    for density in args.densities:
        n_sel = max(1, min(num_blocks, round(density * (num_blocks + 1) / 2)))
        lists = jnp.asarray(causal_block_lists(B, H, num_blocks, n_sel))
        sparse = programs(lambda q, k, v, lists=lists: block_sparse_attention(
            q, k, v, lists, block_size=block, causal=True, implementation=args.implementation))
        s = [best_time(sparse[0], (q, k, v), args.repeats), best_time(sparse[1], (q, k, v, w), args.repeats)]
        results[density] = [d / t for d, t in zip(dense_s, s)]
        print(f"| block sparse ({args.implementation}) | 1/{round(1 / density)} | {n_sel} | {1e3 * s[0]:.1f} | "
              f"{results[density][0]:.2f}x | {1e3 * s[1]:.1f} | {results[density][1]:.2f}x |", flush=True)

    print()
    ordered = [results[d] for d in sorted(results)]
    for i, name in enumerate(("forward", "forward+backward")):
        falls = all(a[i] >= b[i] for a, b in zip(ordered, ordered[1:]))
        print(f"{name}: time falls with density: {'ok' if falls else 'FAIL'}")
        if 1 / 8 in results:
            speedup = results[1 / 8][i]
            print(f"{name}: density 1/8 is {speedup:.1f}x faster than dense causal (need >= 4x): "
                  f"{'ok' if speedup >= 4 else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
