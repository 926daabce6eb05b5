"""Time the Pallas GPU block-sparse attention kernel against dense causal cuDNN attention.

    python experiments/bench/sparse_attention_gpu.py [--seq-len 32768] [--heads 16]
        [--kv-heads 16 4] [--head-dim 128] [--blocks 64 128] [--densities 32 16 8 4 2]
        [--repeats 5] [--no-check]

Needs a GPU (it exits with a message and status 2 on any other backend). For each key/value head
count (16 = multi-head, 4 = a grouped-query row) and block size, dense causal attention
(`dot_product_attention(..., implementation="cudnn")`) is timed once, then
`block_sparse_attention(..., implementation="pallas_gpu")` at each density: query block n lists
its diagonal block plus random earlier blocks, ceil((n + 1) / density) blocks in all (1/density
of its causal blocks). bfloat16, B=1, square blocks. Two timings per row: the forward alone and
forward + backward (one jitted value_and_grad of sum(o * w) w.r.t. q, k, v). Compilation and one
warm-up run are excluded; best of `--repeats` (the machine may be shared). Speedup = dense time /
sparse time in the same run. Before timing, a small check (T=1024, unless --no-check) compares the
kernel's output and gradients with the dense reference on the GPU, since the kernel is only
tested in interpret mode on a CPU.
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


def causal_block_lists(rng, B: int, H: int, num_blocks: int, density: int) -> np.ndarray:
    """int32 [B, H, N, n_sel]: the diagonal block plus random earlier ones, ceil((n+1)/density) per
    query block n, -1 padded."""
    n = np.arange(num_blocks)
    want = -(-(n + 1) // density)                                      # blocks listed per row
    priority = rng.random((B, H, num_blocks, num_blocks))
    priority[..., n, n] = 2.0                                          # diagonal first
    priority = np.where(n[None, :] <= n[:, None], priority, -1.0)       # only causal blocks
    order = np.argsort(-priority, axis=-1)[..., :want.max()].astype(np.int32)
    return np.where(np.arange(want.max()) < want[:, None], order, -1)


def timed_pair(attention, q, k, v, w, *extra, repeats: int) -> tuple[float, float]:
    """(forward seconds, forward + backward seconds) of attention(q, k, v, *extra)."""
    forward = jax.jit(attention)
    loss = lambda q, k, v, w, *extra: jnp.sum(attention(q, k, v, *extra).astype(jnp.float32) * w)
    both = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    return best_time(forward, (q, k, v, *extra), repeats), best_time(both, (q, k, v, w, *extra), repeats)


def make_qkvw(T: int, H: int, Hkv: int, D: int):
    keys = jax.random.split(jax.random.key(T + 7 * Hkv), 4)
    q = jax.random.normal(keys[0], (1, T, H, D), jnp.bfloat16)
    k, v = (jax.random.normal(key, (1, T, Hkv, D), jnp.bfloat16) for key in keys[1:3])
    return q, k, v, jax.random.normal(keys[3], (1, T, H, D), jnp.float32)


def check_against_reference(H: int, Hkv: int, D: int, block: int) -> str:
    """Worst relative error of o, dq, dk, dv against the float32 dense reference at T=1024."""
    T = 1024
    q, k, v, w = make_qkvw(T, H, Hkv, D)
    idx = jnp.asarray(causal_block_lists(np.random.default_rng(1), 1, H, T // block, 4))
    errors = []
    for dtype in (jnp.float32, jnp.bfloat16):
        def loss(q, k, v, impl):
            o = block_sparse_attention(q, k, v, idx, block_size=block, implementation=impl)
            return jnp.sum(o.astype(jnp.float32) * w), o

        run = lambda impl, dt: jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True),
                                       static_argnums=3)(*(x.astype(dt) for x in (q, k, v)), impl)
        (_, got_o), got = run("pallas_gpu", dtype)
        (_, want_o), want = run("reference", jnp.float32)
        worst = max(float(jnp.linalg.norm((g.astype(jnp.float32) - x).ravel()) / jnp.linalg.norm(x.ravel()))
                    for g, x in zip((got_o, *got), (want_o, *want)))
        errors.append(f"{jnp.dtype(dtype).name} {worst:.1e}")
    return ", ".join(errors)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=32768)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, nargs="+", default=[16, 4], help="one table block each")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--blocks", type=int, nargs="+", default=[64, 128])
    p.add_argument("--densities", type=int, nargs="+", default=[32, 16, 8, 4, 2],
                   help="d lists 1/d of the causal blocks")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-check", action="store_true", help="skip the T=1024 check against the reference")
    args = p.parse_args(argv)
    if jax.default_backend() != "gpu":
        print(f"sparse_attention_gpu.py needs a GPU: jax backend is {jax.default_backend()!r} "
              f"(devices {[d.device_kind for d in jax.devices()]}); nothing timed.", file=sys.stderr)
        return 2

    T, H, D = args.seq_len, args.heads, args.head_dim
    print(f"block_sparse_attention pallas_gpu vs dense causal cuDNN on {jax.devices()[0].device_kind}, "
          f"jax {jax.__version__}: B=1 T={T} H={H} D={D} bfloat16, best of {args.repeats}\n")
    print("| Hkv | block | density | listed / causal | fwd ms | fwd speedup | fwd+bwd ms | fwd+bwd speedup |")
    print("|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for Hkv in args.kv_heads:
        q, k, v, w = make_qkvw(T, H, Hkv, D)
        dense = timed_pair(lambda q, k, v: dot_product_attention(q, k, v, causal=True, implementation="cudnn"),
                           q, k, v, w, repeats=args.repeats)
        print(f"| {Hkv} | - | dense causal (cuDNN) | 1 | {1e3 * dense[0]:.2f} | 1.00x | "
              f"{1e3 * dense[1]:.2f} | 1.00x |", flush=True)
        for block in args.blocks:
            if not args.no_check:
                print(f"| {Hkv} | {block} | check at T=1024, density 1/4 | worst rel. error vs reference: "
                      f"{check_against_reference(H, Hkv, D, block)} | | | | |", flush=True)
            num_blocks = -(-T // block)
            causal_blocks = num_blocks * (num_blocks + 1) // 2
            for density in args.densities:
                idx = causal_block_lists(rng, 1, H, num_blocks, density)
                listed = float(np.sum(idx >= 0)) / (H * causal_blocks)
                sparse = timed_pair(lambda q, k, v, idx: block_sparse_attention(
                    q, k, v, idx, block_size=block, implementation="pallas_gpu"), q, k, v, w, jnp.asarray(idx),
                    repeats=args.repeats)
                print(f"| {Hkv} | {block} | 1/{density} | {listed:.3f} | {1e3 * sparse[0]:.2f} | "
                      f"{dense[0] / sparse[0]:.2f}x | {1e3 * sparse[1]:.2f} | {dense[1] / sparse[1]:.2f}x |",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
