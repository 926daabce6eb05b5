"""The jitted training and evaluation steps: pure functions over (state, batch).

The model is split once (`nnx.split`) into a static graph definition and its parameters; the
step merges them inside jit, so no NNX object crosses the jit boundary on the hot path. Gradient
accumulation scans over microbatches and sums token losses, so A microbatches of B/A rows give
the same update as one batch of B rows.
"""

import math
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from arch import CausalLM, ModelConfig
from train.tokenizer import BOS

BATCH_KEYS = ("tokens", "targets", "segment_ids", "positions", "loss_mask")


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState


def create_model(config: ModelConfig, seed: int) -> CausalLM:
    return CausalLM(config, rngs=nnx.Rngs(params=seed))


def init_state(model: CausalLM, optimizer: optax.GradientTransformation) -> tuple[nnx.GraphDef, TrainState]:
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


def abstract_state(config: ModelConfig, optimizer: optax.GradientTransformation) -> tuple[nnx.GraphDef, TrainState]:
    """Graph definition and the shapes/dtypes of a TrainState, without allocating it."""
    model = nnx.eval_shape(lambda: create_model(config, 0))
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                                opt_state=jax.eval_shape(optimizer.init, params))


def token_losses(graphdef: nnx.GraphDef, params: nnx.State, batch: dict) -> jax.Array:
    """Cross-entropy in nats for each position, [B, T] float32 (unmasked)."""
    model = nnx.merge(graphdef, params)
    logits_BxTxV = model(batch["tokens"], segment_ids=batch["segment_ids"], positions=batch["positions"])
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV.astype(jnp.float32), batch["targets"])


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, grad_accum: int) -> Callable:
    def summed_loss(params, micro):
        mask = micro["loss_mask"]
        return jnp.sum(token_losses(graphdef, params, micro) * mask), jnp.sum(mask)

    grad_fn = jax.value_and_grad(summed_loss, has_aux=True)

    def train_step(state: TrainState, batch: dict):
        micro = jax.tree.map(lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)

        def accumulate(carry, mb):
            loss_sum, count, grads = carry
            (l, n), g = grad_fn(state.params, mb)
            return (loss_sum + l, count + n, jax.tree.map(jnp.add, grads, g)), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        (loss_sum, count, grads), _ = jax.lax.scan(accumulate, (0.0, 0.0, zeros), micro)
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss_sum / count, "grad_norm": optax.tree.norm(grads),
                   "lr": schedule(state.step), "loss_tokens": count}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return jax.jit(train_step, donate_argnums=0)


def make_eval_step(graphdef: nnx.GraphDef) -> Callable:
    """Sums for validation: nats over all scored targets and over byte targets (ids < 256)."""

    def eval_step(params, batch):
        nll_BxT = token_losses(graphdef, params, batch)
        mask = batch["loss_mask"]
        byte_mask = mask * (batch["targets"] < BOS)
        return {"nll": jnp.sum(nll_BxT * mask), "tokens": jnp.sum(mask),
                "byte_nll": jnp.sum(nll_BxT * byte_mask), "bytes": jnp.sum(byte_mask)}

    return jax.jit(eval_step)


def summarize_eval(sums: dict) -> dict:
    """val_loss in nats per token; val_bpb = bits per UTF-8 byte of the held-out text."""
    return {"val_loss": sums["nll"] / max(sums["tokens"], 1.0),
            "val_bpb": sums["byte_nll"] / max(sums["bytes"], 1.0) / math.log(2)}
