"""The memory-efficient optimizers' state, measured (issue: 8-bit AdamW, GaLore, FRUGAL):

1. block-wise dynamic quantization's round trip, per block, on N(0,1) and on the real Adam moments
   of a preset after `--adam-steps` AdamW steps, against the float64 reference quantization;
2. the first 20 updates of adamw8bit against float32 AdamW's, on the same real gradients (the
   parameters follow AdamW's trajectory, so the errors do not compound);
3. optimizer state bytes per parameter, exactly from each state tree.

    python experiments/bench/optimizer_state.py --config configs/quickstart.yaml [--adam-steps 100]

Step times: experiments/bench/train_step.py --compare optim.name=adamw8bit ... (same process).
"""

import argparse
import pathlib
import sys

import jax
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from hybrax.train.config import OPTIMIZERS, load_config  # noqa: E402
from hybrax.train.data import build_datasets  # noqa: E402
from hybrax.train.optim import learning_rate_schedule, make_optimizer, state_bytes  # noqa: E402
from hybrax.train.optimizers.block_quantization import (Quantizer, block_layout, dequantize_reference,  # noqa: E402
                                                        quantize_reference)
from hybrax.train.optimizers.parameters import parameter_leaves  # noqa: E402
from hybrax.train.step import abstract_state, accumulate_gradients, create_model, init_state, make_train_step  # noqa


def block_errors(x: np.ndarray, signed: bool, block_size: int) -> dict:
    """Per-block relative round-trip errors |x - Q(x)| / |x| (2-norms over each block) of the JAX
    quantization and of the float64 reference, whether their codes agree, and their largest
    difference per block absmax."""
    layout = block_layout(x.shape, block_size)
    quantizer = Quantizer(signed)
    codes, absmax = jax.jit(lambda v: quantizer.quantize(v, layout))(x)
    ours = np.asarray(quantizer.dequantize(codes, absmax, layout), np.float64)
    ref_codes, ref_absmax = quantize_reference(x, layout, signed)
    ref = dequantize_reference(ref_codes, ref_absmax, layout, signed)

    def per_block(y):
        err = np.asarray(layout.blocked((y - x) ** 2)).sum(axis=layout.block_axes())
        norm = np.asarray(layout.blocked(x.astype(np.float64) ** 2)).sum(axis=layout.block_axes())
        return np.sqrt(err / np.maximum(norm, 1e-300)).ravel()

    scale = np.asarray(layout.unblocked(np.broadcast_to(np.expand_dims(ref_absmax, layout.block_axes()),
                                                        layout.blocked(x).shape)))
    return {"ours": per_block(ours), "ref": per_block(ref), "equal": (np.asarray(codes) == ref_codes).ravel(),
            "diff": np.abs(ours - ref).ravel() / np.maximum(scale.ravel(), 1e-30)}


def summary(parts: list[dict]) -> dict:
    ours, ref = np.concatenate([p["ours"] for p in parts]), np.concatenate([p["ref"] for p in parts])
    equal, diff = np.concatenate([p["equal"] for p in parts]), np.concatenate([p["diff"] for p in parts])
    return {"blocks": ours.size, "mean": ours.mean(), "p99": np.quantile(ours, 0.99), "max": ours.max(),
            "ref_mean": ref.mean(), "ref_max": ref.max(), "codes_equal": equal.mean(), "max_diff": diff.max()}


def adam_moments(opt_state):
    adam = [x for x in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
            if isinstance(x, optax.ScaleByAdamState)][0]
    return parameter_leaves(adam.mu)[0], parameter_leaves(adam.nu)[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--adam-steps", type=int, default=100)
    parser.add_argument("--updates", type=int, default=20)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    block_size, min_size = config.optim.adamw8bit.block_size, config.optim.adamw8bit.min_size
    data = build_datasets(config.data, config.train.seed)
    optimizer = make_optimizer(config.optim, config.train.steps)
    graphdef, state = init_state(create_model(config.model, config.train.seed), optimizer)

    # 2. adamw8bit's first updates against AdamW's, on AdamW's trajectory
    eight = make_optimizer(config.optim.model_copy(update={"name": "adamw8bit"}),
                           config.train.steps)
    eight_state = eight.init(state.params)
    grads_fn = jax.jit(lambda p, ms, b: accumulate_gradients(graphdef, p, ms, b, config.train.grad_accum)[0])
    update32, update8 = jax.jit(optimizer.update), jax.jit(eight.update)
    print("| update | relative error of adamw8bit's update vs AdamW's (all parameters) |\n|---|---|")
    params, opt_state = state.params, state.opt_state
    for step in range(1, args.updates + 1):
        grads = grads_fn(params, state.model_state, next(data.train))
        u32, opt_state = update32(grads, opt_state, params)
        u8, eight_state = update8(grads, eight_state, params)
        a, b = jax.tree.leaves(u8), jax.tree.leaves(u32)
        error = np.sqrt(sum(float(np.sum((x - y) ** 2)) for x, y in zip(a, b)) / max(sum(float(np.sum(y ** 2))
                                                                                       for y in b), 1e-300))
        print(f"| {step} | {error:.4f} |")
        params = optax.apply_updates(params, u32)

    # 1. quantization round trips
    train_step = make_train_step(graphdef, optimizer, learning_rate_schedule(config.optim, config.train.steps),
                                 config.train.grad_accum)
    for _ in range(args.adam_steps - args.updates):
        state, _ = train_step(state, next(data.train))
    mu, nu = adam_moments(state.opt_state)
    normal = np.random.default_rng(0).standard_normal((512, 2048)).astype(np.float32)
    groups = {"N(0,1), 2^20 values (signed map)": [block_errors(normal, True, block_size)],
              "N(0,1)^2 (unsigned map)": [block_errors(normal ** 2, False, block_size)],
              "Adam m, every quantized tensor (signed)": [], "Adam v, every quantized tensor (unsigned)": []}
    for (path, m), (_, v) in zip(mu, nu):
        if m.get_value().size >= min_size:
            groups["Adam m, every quantized tensor (signed)"].append(block_errors(np.asarray(m.get_value()), True,
                                                                                  block_size))
            groups["Adam v, every quantized tensor (unsigned)"].append(block_errors(np.asarray(v.get_value()), False,
                                                                                    block_size))
    print(f"\nround trip per block of <= {block_size} elements (Adam moments after {args.adam_steps} AdamW steps of "
          f"{args.config}); error = |x - Q(x)| / |x| per block\n")
    print("| tensor | blocks | mean | p99 | max | float64 ref: mean | ref: max | codes = ref "
          "| max diff vs ref / absmax |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, parts in groups.items():
        r = summary(parts)
        print(f"| {name} | {r['blocks']} | {r['mean']:.2e} | {r['p99']:.2e} | {r['max']:.2e} | {r['ref_mean']:.2e} | "
              f"{r['ref_max']:.2e} | {r['codes_equal']:.6f} | {r['max_diff']:.1e} |")

    # 3. state bytes
    print("\n| optimizer | state bytes | bytes per parameter |\n|---|---|---|")
    for name in OPTIMIZERS:
        optim = config.optim.model_copy(update={"name": name})
        _, abstract = abstract_state(config.model, make_optimizer(optim, config.train.steps))
        total = state_bytes(abstract.opt_state)
        count = sum(x.size for x in jax.tree.leaves(abstract.params))
        print(f"| {name} | {total:,} | {total / count:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
