"""TransMLA conversion (train/convert_to_mla.py): a grouped-query model and its MLA conversion
compute the same logits (float32, packed documents, odd length), by the parallel form and by
absorbed decoding from the latent cache, at a decoding cache no larger; and end to end, a trained
run converts, checks itself and trains on from the converted checkpoint."""

import json
import re
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from trainer_cli import ROOT, command, metrics, run

from hybrax.train.config import load_config
from hybrax.train.convert_to_mla import ConversionError, convert_optimizer_state, convert_params, converted_config
from hybrax.train.optim import make_optimizer
from hybrax.train.step import create_model

SMALL = ["model.d_model=64", "model.num_layers=2", "model.num_heads=4", "model.dtype=float32",
         "model.mixers=[attention,linear_attention]"]
forward = nnx.jit(lambda model, tokens, segment_ids, positions: model(tokens, segment_ids=segment_ids,
                                                                     positions=positions))
decode = nnx.jit(lambda model, tokens, cache: model(tokens, cache=cache))


def models(kv_heads: int, latent_extra: int, nope_head_dim: int | None):
    config = load_config("quickstart.yaml", SMALL + [f"model.num_kv_heads={kv_heads}"])
    gqa = create_model(config.model, seed=3)
    params = nnx.state(gqa, nnx.Param)   # moved off their initialisation: attention is not uniform
    leaves, treedef = jax.tree.flatten(nnx.to_pure_dict(params))
    rng = np.random.default_rng(0)
    moved = jax.tree.unflatten(treedef, [x + 0.3 * rng.normal(size=x.shape).astype(x.dtype) for x in leaves])
    nnx.replace_by_pure_dict(params, moved)
    nnx.update(gqa, params)
    new_config = converted_config(config, latent_extra, nope_head_dim)
    mla = create_model(new_config.model, seed=5)
    converted = nnx.state(mla, nnx.Param)
    nnx.replace_by_pure_dict(converted, convert_params(moved, config.model, new_config.model))
    nnx.update(mla, converted)
    return config, new_config, gqa, mla


@pytest.mark.parametrize("kv_heads,latent_extra,nope_head_dim", [(2, 0, None), (1, 24, 8), (4, 0, 4)])
def test_the_converted_model_computes_the_same_logits(kv_heads, latent_extra, nope_head_dim):
    config, new_config, gqa, mla = models(kv_heads, latent_extra, nope_head_dim)
    T = 23
    tokens = jax.random.randint(jax.random.key(1), (2, T), 0, 259)
    segment_ids = jnp.asarray([[0] * 9 + [1] * 14, [0] * T])
    positions = jnp.asarray([list(range(9)) + list(range(14)), list(range(T))])
    want = forward(gqa, tokens, segment_ids, positions)
    got = forward(mla, tokens, segment_ids, positions)
    scale = float(jnp.max(jnp.abs(want)))
    assert float(jnp.max(jnp.abs(got - want))) <= 1e-5 * scale
    # absorbed decoding from the latent cache: a prefill of 7, two single tokens, the rest in a chunk
    cache = mla.init_cache(1, T + 3)
    decoded = []
    for start, end in ((0, 7), (7, 8), (8, 9), (9, T)):
        step, cache = decode(mla, tokens[1:, start:end], cache)
        decoded.append(step)
    assert float(jnp.max(jnp.abs(jnp.concatenate(decoded, axis=1) - want[1:]))) <= 1e-5 * scale
    old_cache, new_cache = config.model.kv_cache_bytes_per_token(), new_config.model.kv_cache_bytes_per_token()
    assert new_cache == old_cache + 4 * latent_extra * sum(m == "attention" for m, _ in config.model.layer_pattern())


def test_adam_moments_follow_the_parameters():
    """The converted optimizer state carries Adam's count and maps each moment as its parameter:
    W_kr's are W_k's, W_q_rope's are s^p times W_q's in its group's slot (p = 1, 2), the new
    parameters' first moments are zero and their second the layer's mean, and every other parameter's
    are copied."""
    config = load_config("quickstart.yaml", SMALL + ["model.num_kv_heads=2"])
    new_config = converted_config(config, latent_extra=8)
    optimizer = make_optimizer(config.optim, config.train.steps)
    params = nnx.state(create_model(config.model, seed=3), nnx.Param)
    opt_state = optimizer.init(params)
    for i in range(3):   # three updates with random gradients: moments away from zero
        grads = jax.tree.map(lambda p, i=i: jax.random.normal(jax.random.key(i), p.shape, p.dtype), params)
        _, opt_state = optimizer.update(grads, opt_state, params)
    new_params = nnx.state(create_model(new_config.model, seed=0), nnx.Param)
    converted = convert_optimizer_state(opt_state, optimizer.init(new_params), config.model, new_config.model)
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
    (old,), (new,) = ([x for x in jax.tree.leaves(s, is_leaf=is_adam) if is_adam(x)] for s in (opt_state, converted))
    assert int(new.count) == int(old.count) == 3
    mla = new_config.model.layer_config("mla")
    for power, (old_tree, new_tree) in enumerate(((old.mu, new.mu), (old.nu, new.nu)), start=1):
        a, b = nnx.to_pure_dict(old_tree), nnx.to_pure_dict(new_tree)
        D = a["blocks"][0]["mixer"]["w_q"].shape[-1]
        scale = (mla.key_width / D) ** (0.5 * power)
        gqa, got = a["blocks"][0]["mixer"], b["blocks"][0]["mixer"]
        np.testing.assert_array_equal(got["w_kr"], gqa["w_k"])
        np.testing.assert_allclose(got["w_q_rope"][:, 3, 1], scale * gqa["w_q"][:, 3], rtol=1e-6)
        assert not np.any(got["w_q_rope"][:, 3, 0])
        np.testing.assert_array_equal(got["w_dkv"][:, :2 * D], gqa["w_v"].reshape(-1, 2 * D))
        new = [got["w_uv"], got["w_uk"], got["w_q_nope"], got["w_dkv"][:, 2 * D:]]   # what the conversion adds
        fill = 0.0 if power == 1 else np.mean([np.mean(gqa[n]) for n in ("w_q", "w_k", "w_v", "w_o")])
        for moments in new:
            np.testing.assert_allclose(moments, fill, rtol=1e-6)
        np.testing.assert_array_equal(b["blocks"][1]["mixer"]["w_q"], a["blocks"][1]["mixer"]["w_q"])   # not attention
        np.testing.assert_array_equal(b["embed"]["embedding"], a["embed"]["embedding"])


def test_what_cannot_be_converted_is_refused_in_one_line():
    with pytest.raises(ConversionError, match=r"model.mixers=\['gla'\] has no `attention` layer"):
        converted_config(load_config("quickstart.yaml", ["model.mixers=[gla]"]))
    with pytest.raises(ConversionError, match="--latent-extra=-1 must be >= 0"):
        converted_config(load_config("quickstart.yaml"), latent_extra=-1)
    with pytest.raises(ConversionError, match="the run trains with optim.name=galore; the converter maps AdamW's"):
        converted_config(load_config("quickstart.yaml", ["optim.name=galore"]))


@pytest.mark.slow
def test_a_trained_run_converts_checks_itself_and_trains_on(tmp_path):
    steps = ["model.num_kv_heads=2", "train.steps=12", "train.eval_every=12", "train.eval_batches=4",
             "checkpoint.every=12", "log.sample_tokens=0", "log.tensorboard=false"]
    source, target = tmp_path / "gqa", tmp_path / "mla"
    trained = run(source, *steps)
    assert trained.returncode == 0, trained.stderr[-2000:]
    convert = subprocess.run(command(source)[:2] + ["hybrax.train.convert_to_mla", "--run", str(source), "--out",
                             str(target), "--more-steps", "6"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert convert.returncode == 0, convert.stderr[-2000:]
    line = [x for x in convert.stdout.splitlines() if x.startswith("converted")][0]
    difference = float(line.split("max |logit difference| ")[1].split()[0])
    assert difference <= 1e-4, line
    before, after = re.search(r"decoding cache ([\d,]+) -> ([\d,]+) bytes/token", line).groups()
    assert before == after, line   # no wider latent asked for: GQA's own cache
    again = subprocess.run(command(source)[:2] + ["hybrax.train.convert_to_mla", "--run", str(source), "--out",
                           str(target)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and again.stderr.strip().splitlines()[-1].startswith("error: --out"), again.stderr
    resumed = subprocess.run(command(target)[:2] + ["hybrax.train", "--config", str(target / "config.yaml"),
                             "--run-dir", str(target)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from checkpoint at step 12" in resumed.stdout
    assert [r["step"] for r in metrics(target) if "tokens_per_s" in r][-1] == 18
    assert json.loads((target / "metrics.jsonl").read_text().splitlines()[-1])["val_bpb"] > 0
