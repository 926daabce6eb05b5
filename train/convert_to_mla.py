"""TransMLA (Meng et al., 2025, "TransMLA: Multi-head Latent Attention Is All You Need"): a trained
run's grouped-query `attention` layers become `mla` layers (layers/softmax/mla.py) that compute the
same function with a decoding cache no larger, written as a new run directory that training
continues from.

    hybrax-convert-to-mla --run runs/gqa --out runs/gqa_mla [--latent-extra 64] [--more-steps 200]

The construction, for H query heads of width D in groups of H / Hkv over Hkv key/value heads:

    rope keys     R = Hkv rope heads of Dr = D, W_kr = W_k: the GQA keys, rotary and all
    latent        d_c = Hkv D (+ latent_extra): W_dkv = [W_v | new columns], the GQA values
    values        W_uv[g D + j, h, j] = 1 for a head h of group g: each head reads its group's values
    rope queries  W_q_rope[:, h, g] = s W_q[:, h] for h's group g (zero for the other rope heads),
                  s = sqrt((Dn + R Dr) / D) undoing MLA's wider softmax scale
    nope path     W_uk = 0 and W_q_nope random: it adds nothing now; training grows it
    output        W_o as it was

Head h's score is then s^2 D / (Dn + R Dr) q_h . k_g = q_h . k_g at GQA's scale, exactly: GQA's
replication of a key head to its query heads is a selection, which commutes with rotary (the same
frequencies on every head), so the rotary keys need not be decoded per head: the paper's argument
that MLA represents GQA at the same cache. The cache is d_c + R Dr = 2 Hkv D numbers per token,
GQA's own; `--latent-extra` widens the latent for further training (its columns decode through zero
rows of W_uk and W_uv, so the function is unchanged until training moves them).

Not done here: the paper's later steps for DeepSeek's layout (one rope head): RoRoPE rotates the key
heads per frequency (orthogonal, exact) to gather the positional signal into one head, then keeps
rotary on that head only, and BKV-PCA compresses the other key channels with the values into a
smaller latent. Both drop information (the paper fine-tunes after them), and the conversion here
is exact.

The new run holds config.yaml (the `attention` mixers replaced by `mla`, train.steps raised by
`--more-steps`) and one checkpoint at the old step: the converted parameters, every other parameter
and the data position as they were, and the optimizer state carried over (Adam's step count, and its
moments mapped as the parameters are; see convert_attention for what is new). Training on from it
works, but not as well as training the GQA run on (experiments/bench/RESULTS.md: at the run's own
learning rate 200 more steps lose 0.11 bpb where GQA gains 0.02; a fifth of it holds the converted
model's val_bpb); pass a lower optim.lr when continuing. The converter checks its own work on
held-out batches (`--check-batches`, 4; 0: all): the largest logit difference in float32 (above
TOLERANCE nothing is written) and val_bpb before and after, in one line.
"""

import argparse
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from flax import nnx

TOLERANCE = 1e-4   # largest |logit difference| (float32) the conversion accepts


class ConversionError(ValueError):
    """A run that cannot be converted, or a conversion that did not compute the same function."""


def mla_settings(model, latent_extra: int, nope_head_dim: int | None) -> dict:
    """model.mla for a ModelConfig whose `attention` layers are converted (see the module docstring)."""
    attention = model.layer_config("attention")
    D, Hkv = attention.head_dim, attention.num_kv_heads
    return {"nope_head_dim": nope_head_dim or D, "value_head_dim": D, "kv_latent": Hkv * D + latent_extra,
            "rope_heads": Hkv, "rope_head_dim": D}


def converted_config(config, latent_extra: int = 0, nope_head_dim: int | None = None, more_steps: int = 200):
    """The run's Config with its `attention` mixers made `mla` and train.steps raised by `more_steps`."""
    from hybrax.train.config import build_config

    model = config.model
    if model.recursion is not None:
        raise ConversionError("model.recursion: the shared stack's attention cannot be converted; convert a run "
                              "without it")
    if "attention" not in model.mixers:
        raise ConversionError(f"model.mixers={list(model.mixers)} has no `attention` layer to convert")
    if latent_extra < 0:
        raise ConversionError(f"--latent-extra={latent_extra} must be >= 0")
    if config.optim.name != "adamw":
        raise ConversionError(f"the run trains with optim.name={config.optim.name}; the converter maps AdamW's moments "
                              "only (optim.name=adamw)")
    tree = yaml.safe_load(config.to_yaml())
    tree["model"]["mixers"] = ["mla" if m == "attention" else m for m in model.mixers]
    tree["model"]["mla"] = {**tree["model"].get("mla", {}), **mla_settings(model, latent_extra, nope_head_dim)}
    tree["train"]["steps"] = config.train.steps + more_steps
    return build_config(tree)


def convert_attention(attention: dict, mla, key: jax.Array, moment: int | None = None) -> dict:
    """An `mla` layer's parameters (pure dict) computing the `attention` layer whose parameters are
    `attention` (pure dict), under MLA config `mla`. With `moment` 1 or 2, `attention` holds Adam's
    first or second moments of those parameters instead, and the result the MLA layer's: they follow
    the same linear map (its scale to the power `moment`). What is new (the nope path, the 0/1
    up-projection of the values, the extra latent columns) gets no first moment and, as its second,
    the mean of the layer's: with none, Adam's first steps would move each of its entries by about
    the learning rate whatever its gradient, and the 0/1 up-projection would mix every value channel
    into every other."""
    w_q, w_k, w_v, w_o = (np.asarray(attention[n], np.float64) for n in ("w_q", "w_k", "w_v", "w_o"))
    d, H, D = w_q.shape
    Hkv = w_k.shape[1]
    group = H // Hkv
    Dn, C = mla.nope_head_dim, mla.kv_latent
    scale = math.sqrt(mla.key_width / D) ** (moment or 1)
    w_q_rope = np.zeros((d, H, Hkv, D))
    w_uv = np.zeros((C, H, D))
    for h in range(H):
        g = h // group
        w_q_rope[:, h, g] = scale * w_q[:, h]
        w_uv[g * D:(g + 1) * D, h] = np.eye(D)
    keys = jax.random.split(key, 2)
    extra = mla.init_std * np.asarray(jax.random.normal(keys[0], (d, C - Hkv * D)))
    w_q_nope = mla.init_std * np.asarray(jax.random.normal(keys[1], (d, H, Dn)))
    w_uk = np.zeros((C, H, Dn))
    if moment is not None:   # what is new: no first moment; a second moment at the layer's mean (below)
        fill = 0.0 if moment == 1 else float(np.mean([np.mean(a) for a in (w_q, w_k, w_v, w_o)]))
        extra, w_q_nope, w_uv, w_uk = (np.full_like(a, fill) for a in (extra, w_q_nope, w_uv, w_uk))
    dtype = np.asarray(attention["w_q"]).dtype
    params = {"w_q_nope": w_q_nope, "w_q_rope": w_q_rope, "w_dkv": np.concatenate([w_v.reshape(d, Hkv * D), extra], 1),
              "w_uk": w_uk, "w_uv": w_uv, "w_kr": w_k, "w_o": w_o}
    return {name: jnp.asarray(value, dtype) for name, value in params.items()}


def convert_params(old: dict, old_model, new_model, seed: int = 0, moment: int | None = None) -> dict:
    """The new model's parameters (pure dict) from the old one's: `attention` blocks converted, every
    other parameter copied. With `moment` 1 or 2: Adam's moments of them (see convert_attention)."""
    new = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: _model(new_model)), nnx.Param))
    mla = new_model.layer_config("mla")
    keys = jax.random.split(jax.random.key(seed), old_model.num_layers)
    out = jax.tree.map(lambda x: x, old)   # a copy of the containers
    for i, (mixer, _) in enumerate(old_model.layer_pattern()):
        if mixer == "attention":
            out["blocks"][i]["mixer"] = convert_attention(old["blocks"][i]["mixer"], mla, keys[i], moment)
    shapes = jax.tree.map(lambda x: x.shape, new)
    got = jax.tree.map(lambda x: x.shape, out)
    if shapes != got:
        raise ConversionError("the converted parameters do not fit the converted model (a bug): "
                              f"{jax.tree.structure(shapes)} vs {jax.tree.structure(got)}")
    return out


def convert_optimizer_state(old_state, new_state, old_model, new_model):
    """`new_state` (the converted model's fresh optimizer state) with every Adam state of `old_state`
    carried over: its step count, and its first and second moments mapped as the parameters are."""
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
    old_adams = [x for x in jax.tree.leaves(old_state, is_leaf=is_adam) if is_adam(x)]
    leaves, treedef = jax.tree.flatten(new_state, is_leaf=is_adam)
    carried = iter(old_adams)
    for i, leaf in enumerate(leaves):
        if is_adam(leaf):
            old = next(carried)
            moments = []
            for power, (old_tree, new_tree) in enumerate(((old.mu, leaf.mu), (old.nu, leaf.nu)), start=1):
                converted = convert_params(nnx.to_pure_dict(old_tree), old_model, new_model, moment=power)
                nnx.replace_by_pure_dict(new_tree, converted)
                moments.append(new_tree)
            leaves[i] = optax.ScaleByAdamState(count=old.count, mu=moments[0], nu=moments[1])
    return jax.tree.unflatten(treedef, leaves)


def _model(model_config, seed: int = 0):
    from hybrax.train.step import create_model
    return create_model(model_config, seed)


def _restore(run_dir: pathlib.Path):
    """(config, step, TrainState, data state) of the run's latest checkpoint."""
    from hybrax.train.sample import restore_latest

    if not (run_dir / "config.yaml").is_file():
        raise ConversionError(f"--run {str(run_dir)!r} has no config.yaml; expected a run directory of hybrax-train")
    try:
        config, step, _, state, data_state = restore_latest(run_dir)
    except FileNotFoundError as e:
        raise ConversionError(str(e)) from None
    return config, step, state, data_state


def held_out_check(old_config, old_params: dict, new_config, new_params: dict, batches: int | None = 4) -> dict:
    """On `batches` held-out batches (None: all of them): the largest |logit difference| of the two
    models in float32 and each one's val_bpb at the run's own dtype."""
    from hybrax.train.data import build_datasets, validation_batches
    from hybrax.train.step import make_eval_step, summarize_eval
    from hybrax.train.tokenizer import load_tokenizer

    data = build_datasets(old_config.data, old_config.train.seed)
    held_out = list(validation_batches(data, old_config.data, batches))
    lengths = load_tokenizer(old_config.data.tokenizer).byte_lengths()
    result = {"logit_max_abs_diff": 0.0, "batches": len(held_out)}

    def model_of(model_config, params, dtype=None):
        model_config = model_config if dtype is None else _with_dtype(model_config, dtype)
        model = nnx.eval_shape(lambda: _model(model_config))
        graphdef, state, rest = nnx.split(model, nnx.Param, ...)
        nnx.replace_by_pure_dict(state, params)
        return graphdef, state, rest

    for tag, (model_config, params) in {"before": (old_config.model, old_params),
                                        "after": (new_config.model, new_params)}.items():
        graphdef, state, rest = model_of(model_config, params)
        eval_step = make_eval_step(graphdef, lengths)
        sums = {"nll": 0.0, "tokens": 0.0, "byte_nll": 0.0, "bytes": 0.0}
        for batch in held_out:
            out = eval_step(state, rest, {k: jnp.asarray(v) for k, v in batch.items()})
            for k in sums:
                sums[k] += float(out[k])
        result[f"val_bpb_{tag}"] = summarize_eval(sums)["val_bpb"]
    logits = []
    for model_config, params in ((old_config.model, old_params), (new_config.model, new_params)):
        graphdef, state, rest = model_of(model_config, params, "float32")
        forward = jax.jit(lambda state, rest, batch, graphdef=graphdef: nnx.merge(graphdef, state, rest)(
            batch["tokens"], segment_ids=batch["segment_ids"], positions=batch["positions"]))
        logits.append([np.asarray(forward(state, rest, {k: jnp.asarray(v) for k, v in b.items()})) for b in held_out])
    result["logit_max_abs_diff"] = max(float(np.max(np.abs(a - b))) for a, b in zip(*logits))
    return result


def _with_dtype(model_config, dtype: str):
    return type(model_config).model_validate({**model_config.model_dump(), "dtype": dtype})


def convert_run(run_dir: pathlib.Path, out_dir: pathlib.Path, *, latent_extra: int = 0,
                nope_head_dim: int | None = None, more_steps: int = 200, seed: int = 0, check_batches: int | None = 4,
                log=print) -> dict:
    """Converts the latest checkpoint of `run_dir` into a new run in `out_dir` (see the module
    docstring); returns the held-out check's numbers. ConversionError when the logits differ by
    more than TOLERANCE before `latent_extra` widens anything."""
    from hybrax.train.checkpoint import Checkpointer
    from hybrax.train.optim import make_optimizer
    from hybrax.train.run import write_atomically
    from hybrax.train.step import TrainState

    run_dir, out_dir = pathlib.Path(run_dir), pathlib.Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConversionError(f"--out {str(out_dir)!r} is not empty; name a new run directory")
    config, step, state, data_state = _restore(run_dir)
    new_config = converted_config(config, latent_extra, nope_head_dim, more_steps)
    old_params = nnx.to_pure_dict(state.params)
    new_params = convert_params(old_params, config.model, new_config.model, seed)
    check = held_out_check(config, old_params, new_config, new_params, check_batches)
    check.update(step=step, cache_bytes_per_token_before=config.model.kv_cache_bytes_per_token(),
                 cache_bytes_per_token_after=new_config.model.kv_cache_bytes_per_token())
    if check["logit_max_abs_diff"] > TOLERANCE:
        raise ConversionError(f"the converted model's logits differ by {check['logit_max_abs_diff']:.2e} > "
                              f"{TOLERANCE:g} from the run's on held-out text; nothing was written")
    model = nnx.eval_shape(lambda: _model(new_config.model))
    _, params, model_state = nnx.split(model, nnx.Param, ...)
    nnx.replace_by_pure_dict(params, new_params)
    optimizer = make_optimizer(new_config.optim, new_config.train.steps)
    opt_state = convert_optimizer_state(state.opt_state, optimizer.init(params), config.model, new_config.model)
    new_state = TrainState(step=jnp.asarray(step, jnp.int32), params=params, model_state=state.model_state,
                           opt_state=opt_state)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(out_dir / "config.yaml", new_config.to_yaml())
    checkpointer = Checkpointer(out_dir, new_config.checkpoint, log=log)
    checkpointer.save(step, new_state, data_state, wait=True)
    checkpointer.close()
    log(f"converted {run_dir} (step {step}) to MLA in {out_dir}: max |logit difference| "
        f"{check['logit_max_abs_diff']:.2e} (float32, {check['batches']} held-out batches), val_bpb "
        f"{check['val_bpb_before']:.4f} -> {check['val_bpb_after']:.4f}, decoding cache "
        f"{check['cache_bytes_per_token_before']:,.0f} -> {check['cache_bytes_per_token_after']:,.0f} bytes/token; "
        "continue with: hybrax-train --config "
        f"{out_dir / 'config.yaml'} --run-dir {out_dir}")
    return check


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="hybrax-convert-to-mla", description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, type=pathlib.Path, help="the grouped-query run directory")
    p.add_argument("--out", required=True, type=pathlib.Path, help="the new run directory (empty or absent)")
    p.add_argument("--latent-extra", type=int, default=0, help="latent columns beyond Hkv D, for further training")
    p.add_argument("--nope-head-dim", type=int, default=None, help="per-head width of the nope path (head_dim)")
    p.add_argument("--more-steps", type=int, default=200, help="train.steps of the new run: the old ones plus this")
    p.add_argument("--seed", type=int, default=0, help="the seed of the new (inert) parameters")
    p.add_argument("--check-batches", type=int, default=4, help="held-out batches of the check (0: all)")
    args = p.parse_args(argv)
    from hybrax.train.config import ConfigError
    try:
        convert_run(args.run, args.out, latent_extra=args.latent_extra, nope_head_dim=args.nope_head_dim,
                    more_steps=args.more_steps, seed=args.seed, check_batches=args.check_batches or None)
    except (ConversionError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
