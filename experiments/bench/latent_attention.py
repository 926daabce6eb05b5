"""One attention layer of each variant of the latent-attention sweep (configs/sweeps/latent_attention.yaml:
MHA, GQA, MLA, CCA at compression 2 and 4, CCGQA), at the quickstart's width, timed forward + backward.

    python experiments/bench/latent_attention.py [--length 4096] [--batch 1] [--repeats 3]

Per variant: the layer's parameters, its decoding cache in bytes per token (in the preset's
bfloat16), its forward FLOPs per token at the timed length (`flops_per_token`: projections and the
full square of scores), and the time of one jitted value-and-grad of sum(y * w) with respect to the
input and every parameter, in float32 on the default backend (compilation and a warm-up run
excluded, best of `--repeats`), with its ratio to MHA's.
"""

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import yaml
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from hybrax.arch.registry import MIXERS  # noqa: E402
from hybrax.configs import DIRECTORY  # noqa: E402
from hybrax.experiments.bench.timing import best_time  # noqa: E402
from hybrax.train.config import load_config  # noqa: E402

SWEEP = DIRECTORY / "sweeps" / "latent_attention.yaml"


def variants() -> dict[str, list[str]]:
    """The sweep's model grid: name -> overrides of the quickstart preset."""
    return yaml.safe_load(SWEEP.read_text())["grid"]["model"]


def layer(overrides: list[str], dtype: str):
    """(mixer config, mixer module) of the first layer of the quickstart with `overrides`."""
    model = load_config("quickstart.yaml", [*overrides, f"model.dtype={dtype}"]).model
    name = model.mixers[0]
    return MIXERS.config_for(name, model), MIXERS.build(name, model, rngs=nnx.Rngs(0))


def step(module):
    graphdef, params = nnx.split(module)

    def loss(params, x, w):
        return jnp.sum(nnx.merge(graphdef, params)(x) * w)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), params


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    T, B = args.length, args.batch
    rows = []
    for name, overrides in variants().items():
        config, module = layer(overrides, "float32")
        cache_config, _ = layer(overrides, "bfloat16")
        fn, params = step(module)
        x = jax.random.normal(jax.random.key(0), (B, T, config.d_model), jnp.float32)
        w = jax.random.normal(jax.random.key(1), (B, T, config.d_model), jnp.float32)
        seconds = best_time(fn, (params, x, w), args.repeats)
        rows.append((name, config.num_params(), cache_config.kv_cache_bytes_per_token(),
                     cache_config.state_bytes_per_sequence(), config.flops_per_token(T), seconds))
    base = rows[0][-1]
    print(f"One layer, d_model {config.d_model}, T = {T}, B = {B}, float32, {jax.devices()[0].device_kind}")
    print("| variant | params | KV bytes/token (bf16) | fixed state bytes/seq | MFLOP/token (fwd) | fwd+bwd ms | "
          "/ MHA |")
    print("|---|---|---|---|---|---|---|")
    for name, params, per_token, state, flops, seconds in rows:
        print(f"| {name} | {params:,} | {per_token:,.0f} | {state:,} | {flops / 1e6:.2f} | {1e3 * seconds:.1f} | "
              f"{seconds / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
