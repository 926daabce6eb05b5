"""Time the mixture-of-experts FFN against a dense SwiGLU with the same active parameters.

    python experiments/bench/moe.py [--tokens 4096] [--d-model 512] [--dtype float32] [--repeats 5]

Each row is one expert layout (E experts of width F, top-k): the MoE layer (float32 router, top-k,
sort, grouped matmuls, unsort, combine; no shared expert) against `SwiGLU(d_model, k F)`, which
does the same expert matmul FLOPs per token, in the same run. Rows:

- `moe dropless (router)`: the whole layer with its own router at initialisation (random inputs:
  near-balanced load; the measured max/mean load is printed);
- `moe dropless (balanced)`: the same dispatch with exactly balanced assignments (token n picks
  experts n, n + 1, ... mod E);
- `moe capacity cf=1.25 (router)`: capacity mode, for comparison.

Forward and forward+backward (value and gradients with respect to the input and every weight) are
jitted; the best of `--repeats` runs after a warm-up is reported (the machine is shared). The
acceptance line is the issue's: at balanced load the dropless layer costs <= 1.5x the dense layer.
"""

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from hybrax.experiments.bench.timing import best_time  # noqa: E402
from hybrax.layers.mlp import MLPConfig, SwiGLU  # noqa: E402
from hybrax.layers.moe import MoE, MoEConfig  # noqa: E402
from hybrax.layers.moe.balancing import assignment_counts, imbalance  # noqa: E402
from hybrax.layers.moe.dropless import dropless  # noqa: E402

LAYOUTS = ((8, 2, None), (16, 2, None), (64, 8, 4))   # (E, top_k, F as a fraction of d_model: None = d_model)


def timed(module_fn, module, x, repeats):
    """(forward seconds, forward+backward seconds) of module_fn(module, x)."""
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def loss(params, x):
        return jnp.sum(module_fn(nnx.merge(graphdef, params, rest), x).astype(jnp.float32))

    fwd = jax.jit(lambda p, x: module_fn(nnx.merge(graphdef, p, rest), x))
    fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    return best_time(fwd, (params, x), repeats), best_time(fwd_bwd, (params, x), repeats)


def balanced_dispatch(moe: MoE, x_BxTxD):
    """The dropless dispatch with exactly balanced assignments (router skipped, weights 1/k)."""
    c = moe.config
    B, T, D = x_BxTxD.shape
    N = B * T
    experts_NxK = (jnp.arange(N)[:, None] + jnp.arange(c.top_k)[None, :]) % c.num_experts
    weights_NxK = jnp.full((N, c.top_k), 1.0 / c.top_k, jnp.float32)
    y = dropless(x_BxTxD.reshape(N, D), experts_NxK, weights_NxK, moe.w_gate[...], moe.w_up[...], moe.w_down[...],
                 dtype=c.dtype, implementation=c.implementation)
    return y.reshape(B, T, D)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--implementation", default=None, help="grouped_matmul implementation (default: best)")
    args = parser.parse_args()
    D, N = args.d_model, args.tokens
    x = jax.random.normal(jax.random.key(0), (N // 512, 512, D), jnp.float32).astype(args.dtype)
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}, "
          f"{N} tokens, d_model {D}, {args.dtype}; ms per call, best of {args.repeats}")
    print(f"{'layout':<22} {'row':<32} {'fwd ms':>8} {'fwd+bwd ms':>11} {'fwd x':>7} {'fwd+bwd x':>10}")
    verdicts = []
    for E, k, F_div in LAYOUTS:
        F = D // F_div if F_div else D
        common = dict(d_model=D, num_experts=E, top_k=k, expert_hidden=F, dtype=args.dtype,
                      implementation=args.implementation)
        dense = SwiGLU(MLPConfig(d_model=D, hidden=k * F, dtype=args.dtype), rngs=nnx.Rngs(0))
        base = timed(lambda m, x: m(x), dense, x, args.repeats)
        moe = MoE(MoEConfig(**common), rngs=nnx.Rngs(0))
        capacity = MoE(MoEConfig(**common, dispatch="capacity", capacity_factor=1.25), rngs=nnx.Rngs(0))
        load = float(imbalance(assignment_counts(moe.routing(x.reshape(N, D)).experts_NxK, E)))
        layout = f"E={E} k={k} F={F}"
        rows = [(f"dense SwiGLU hidden={k * F}", base),
                (f"moe dropless (router, load {load:.2f})", timed(lambda m, x: m(x), moe, x, args.repeats)),
                ("moe dropless (balanced)", timed(balanced_dispatch, moe, x, args.repeats)),
                ("moe capacity cf=1.25 (router)", timed(lambda m, x: m(x), capacity, x, args.repeats))]
        for name, (f, fb) in rows:
            print(f"{layout:<22} {name:<32} {f * 1e3:8.2f} {fb * 1e3:11.2f} {f / base[0]:7.2f} {fb / base[1]:10.2f}")
        balanced = rows[2][1]
        verdicts.append((layout, balanced[0] / base[0], balanced[1] / base[1]))
    for layout, f, fb in verdicts:
        ok = "yes" if max(f, fb) <= 1.5 else "NO"
        print(f"{layout}: dropless at balanced load costs {f:.2f}x (fwd) / {fb:.2f}x (fwd+bwd) the dense layer; "
              f"<= 1.5x: {ok}")


if __name__ == "__main__":
    main()
