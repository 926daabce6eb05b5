"""The jitted step: gradient accumulation equals one big batch, the loss goes down, and
validation bits per byte follow from the per-byte cross-entropy."""

import math

import jax
import numpy as np

from hybrax.arch import ModelConfig
from hybrax.train.config import DataConfig, OptimConfig
from hybrax.train.data import build_datasets
from hybrax.train.optim import learning_rate_schedule, make_optimizer
from hybrax.train.step import create_model, init_state, make_eval_step, make_train_step, summarize_eval, token_losses
from hybrax.train.tokenizer import ByteTokenizer

MODEL = ModelConfig(d_model=32, num_layers=2, num_heads=2)
DATA = DataConfig(seq_len=32, batch_size=8)


def run_steps(grad_accum: int, steps: int = 3):
    optim = OptimConfig(lr=1e-2, warmup_steps=1)
    optimizer = make_optimizer(optim, 10)
    graphdef, state = init_state(create_model(MODEL, 0), optimizer)
    step = make_train_step(graphdef, optimizer, learning_rate_schedule(optim, 10), grad_accum)
    data = build_datasets(DATA, seed=0)
    losses = []
    for _ in range(steps):
        state, metrics = step(state, next(data.train))
        losses.append(float(metrics["loss"]))
    return state, losses


def test_gradient_accumulation_equals_one_batch():
    state1, losses1 = run_steps(grad_accum=1)
    state4, losses4 = run_steps(grad_accum=4)
    np.testing.assert_allclose(losses1, losses4, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state1.params), jax.tree.leaves(state4.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_loss_starts_near_uniform_and_falls():
    _, losses = run_steps(grad_accum=1, steps=12)
    assert abs(losses[0] - math.log(259)) < 0.1  # small init: close to the uniform distribution
    assert losses[-1] < losses[0] - 0.5


def test_eval_bits_per_byte():
    optimizer = make_optimizer(OptimConfig(), 10)
    graphdef, state = init_state(create_model(MODEL, 0), optimizer)
    batch = next(build_datasets(DATA, seed=0).train)
    sums = jax.device_get(make_eval_step(graphdef, ByteTokenizer().byte_lengths())(state.params, state.model_state, batch))
    nll = np.asarray(token_losses(graphdef, state.params, state.model_state, batch))
    is_byte = (batch["loss_mask"] > 0) & (batch["targets"] < 256)
    np.testing.assert_allclose(sums["byte_nll"], nll[is_byte].sum(), rtol=1e-5)
    assert sums["bytes"] == is_byte.sum() and sums["tokens"] == batch["loss_mask"].sum()
    out = summarize_eval(sums)
    np.testing.assert_allclose(out["val_bpb"], nll[is_byte].mean() / math.log(2), rtol=1e-5)
