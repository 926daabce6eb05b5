"""The jitted training and evaluation steps: pure functions over (state, batch).

The model is split once (`nnx.split`) into a static graph definition and its parameters; the
step merges them inside jit, so no NNX object crosses the jit boundary on the hot path. Gradient
accumulation scans over microbatches and sums token losses, so A microbatches of B/A rows give
the same update as one batch of B rows.

Layers may report auxiliary losses and metrics and keep non-gradient state (layers/auxiliary.py):
the train step runs the model in training mode, adds the reported losses to the mean token loss
(each weighted by its microbatch's share of the tokens), logs them under `aux/<path>`, and carries
the updated `RouterState` variables from one microbatch to the next into `TrainState.model_state`.
When layers need a statistic of the whole global batch before their loss (`BatchStatistic`, e.g.
expert counts for global-batch balancing) and the batch is split into microbatches, a forward-only
statistics pass over all microbatches fills it first (one extra forward pass per step).
"""

import math
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from hybrax.arch import CausalLM, ModelConfig
from hybrax.layers.auxiliary import BatchStatistic, RouterState, forward_with_auxiliaries

BATCH_KEYS = ("tokens", "targets", "segment_ids", "positions", "loss_mask")


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State          # nnx.Param: what the optimiser updates
    model_state: nnx.State     # RouterState: non-gradient state the forward pass updates in training
    opt_state: optax.OptState


@jax.jit
def state_is_finite(state: TrainState) -> jax.Array:
    """True when every floating-point value of the state (parameters, router state, optimizer
    moments) is finite: checked before a checkpoint is written, so none holds a NaN."""
    leaves = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def create_model(config: ModelConfig, seed: int) -> CausalLM:
    return CausalLM(config, rngs=nnx.Rngs(params=seed))


def init_state(model: CausalLM, optimizer: optax.GradientTransformation) -> tuple[nnx.GraphDef, TrainState]:
    graphdef, params, model_state = nnx.split(model, nnx.Param, RouterState)
    return graphdef, TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                                opt_state=optimizer.init(params))


def abstract_state(config: ModelConfig, optimizer: optax.GradientTransformation) -> tuple[nnx.GraphDef, TrainState]:
    """Graph definition and the shapes/dtypes of a TrainState, without allocating it."""
    model = nnx.eval_shape(lambda: create_model(config, 0))
    graphdef, params, model_state = nnx.split(model, nnx.Param, RouterState)
    return graphdef, TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, model_state=model_state,
                                opt_state=jax.eval_shape(optimizer.init, params))


def merge_model(graphdef: nnx.GraphDef, state: TrainState) -> CausalLM:
    """The model of a TrainState (in evaluation mode, as built)."""
    return nnx.merge(graphdef, state.params, state.model_state)


def forward(graphdef: nnx.GraphDef, params: nnx.State, model_state: nnx.State, batch: dict, *, training: bool,
            batch_statistics: str = "own"):
    """(cross-entropy in nats per position [B, T] float32 (unmasked), reported aux losses {path: scalar},
    reported metrics {path: scalar}, the model state after this forward pass). `batch_statistics`
    ("own", "collect", "use") is set on every layer that keeps a BatchStatistic."""
    model = nnx.merge(graphdef, params, model_state, copy=True)
    model.train() if training else model.eval()
    if batch_statistics != "own":
        model.set_attributes(batch_statistics=batch_statistics, raise_if_not_found=False)
    logits_BxTxV, losses, metrics = forward_with_auxiliaries(
        model, batch["tokens"], segment_ids=batch["segment_ids"], positions=batch["positions"],
        modality_ids=batch.get("modality_ids"))
    nll_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV.astype(jnp.float32), batch["targets"])
    return nll_BxT, losses, metrics, nnx.state(model, RouterState)


def token_losses(graphdef: nnx.GraphDef, params: nnx.State, model_state: nnx.State, batch: dict) -> jax.Array:
    """Cross-entropy in nats for each position, [B, T] float32 (unmasked), in evaluation mode."""
    return forward(graphdef, params, model_state, batch, training=False)[0]


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def has_batch_statistics(model_state: nnx.State) -> bool:
    return any(isinstance(v, BatchStatistic) for v in jax.tree.leaves(model_state, is_leaf=_is_variable))


def _map_statistics(fn: Callable, model_state: nnx.State, other: nnx.State | None = None) -> nnx.State:
    """model_state with each BatchStatistic variable v replaced by fn(v, other's v)."""
    other = model_state if other is None else other
    return jax.tree.map(lambda v, o: v.replace(fn(v[...], o[...])) if isinstance(v, BatchStatistic) else v,
                        model_state, other, is_leaf=_is_variable)


def collect_batch_statistics(graphdef: nnx.GraphDef, params: nnx.State, model_state: nnx.State,
                             microbatches: dict) -> nnx.State:
    """model_state with every BatchStatistic summed over all microbatches (a forward-only pass in
    training mode; everything else the pass changes, e.g. routing state, is discarded)."""
    def add(ms, mb):
        return forward(graphdef, params, ms, mb, training=True, batch_statistics="collect")[3], None

    zeroed = _map_statistics(lambda v, _: jnp.zeros_like(v), model_state)
    collected, _ = jax.lax.scan(add, zeroed, microbatches)
    return _map_statistics(lambda _, new: new, model_state, collected)


def _objective(graphdef, params, model_state, micro, batch_statistics):
    """Summed token losses + (sum of aux losses) x tokens: divided by all tokens of the batch
    later, this is the mean token loss plus the token-weighted mean of the aux losses."""
    nll_BxT, losses, metrics, model_state = forward(graphdef, params, model_state, micro, training=True,
                                                    batch_statistics=batch_statistics)
    mask = micro["loss_mask"]
    count, nll_sum = jnp.sum(mask), jnp.sum(nll_BxT * mask)
    aux_loss = sum(losses.values(), jnp.zeros((), jnp.float32))
    reported = {"aux_loss": aux_loss, **{f"aux/{k}": v for k, v in {**metrics, **losses}.items()}}
    return nll_sum + aux_loss * count, (nll_sum, count, reported, model_state)


def accumulate_gradients(graphdef: nnx.GraphDef, params: nnx.State, model_state: nnx.State, batch: dict,
                         grad_accum: int):
    """Mean-token-loss gradients of one batch split into `grad_accum` microbatches:
    (grads, mean loss, scored tokens, reported aux values per microbatch, new model state)."""
    # microbatch a = rows a, a + A, a + 2A, ...: each device's block of rows holds its share of every
    # microbatch, so the scan over microbatches moves no rows between data shards
    micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1),
                         batch)
    batch_statistics = "own"   # with one microbatch, it is the batch
    if grad_accum > 1 and has_batch_statistics(model_state):
        model_state = collect_batch_statistics(graphdef, params, model_state, micro)
        batch_statistics = "use"
    grad_fn = jax.grad(_objective, argnums=1, has_aux=True)

    def accumulate(carry, mb):
        loss_sum, count, grads, model_state = carry
        g, (l, n, reported, model_state) = grad_fn(graphdef, params, model_state, mb, batch_statistics)
        return (loss_sum + l, count + n, jax.tree.map(jnp.add, grads, g), model_state), reported

    zeros = jax.tree.map(jnp.zeros_like, params)
    (loss_sum, count, grads, model_state), reported = jax.lax.scan(
        accumulate, (0.0, 0.0, zeros, model_state), micro)
    count = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    return grads, loss_sum / count, count, reported, model_state


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, grad_accum: int, *, state_sharding=None,
                    metrics_sharding=None) -> Callable:
    """The jitted step (state, batch) -> (state, metrics); the state is donated. With shardings
    (train.sharding), the new state keeps the old one's layout and the metrics are replicated."""

    def train_step(state: TrainState, batch: dict):
        grads, loss, count, reported, model_state = accumulate_gradients(
            graphdef, state.params, state.model_state, batch, grad_accum)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
                   "lr": schedule(state.step), "loss_tokens": count,
                   **jax.tree.map(lambda x: jnp.mean(x, axis=0), reported)}
        return TrainState(step=state.step + 1, params=params, model_state=model_state, opt_state=opt_state), metrics

    if state_sharding is None:
        return jax.jit(train_step, donate_argnums=0)
    return jax.jit(train_step, donate_argnums=0, out_shardings=(state_sharding, metrics_sharding))


def make_eval_step(graphdef: nnx.GraphDef, byte_lengths: np.ndarray, *, metrics_sharding=None) -> Callable:
    """Sums for validation: nats over all scored targets; nats over the targets that are text (not
    a special token) and the UTF-8 bytes those stand for (`byte_lengths[id]`, from the tokenizer),
    so bits per byte compare across tokenizers."""
    lengths = np.asarray(byte_lengths, np.float32)

    def eval_step(params, model_state, batch):
        nll_BxT = token_losses(graphdef, params, model_state, batch)
        mask = batch["loss_mask"]
        target_bytes = jnp.asarray(lengths)[batch["targets"]]
        text_mask = mask * (target_bytes > 0)
        return {"nll": jnp.sum(nll_BxT * mask), "tokens": jnp.sum(mask),
                "byte_nll": jnp.sum(nll_BxT * text_mask), "bytes": jnp.sum(target_bytes * mask)}

    return jax.jit(eval_step) if metrics_sharding is None else jax.jit(eval_step, out_shardings=metrics_sharding)


def summarize_eval(sums: dict) -> dict:
    """val_loss in nats per token; val_bpb = bits per UTF-8 byte of the held-out text."""
    return {"val_loss": sums["nll"] / max(sums["tokens"], 1.0),
            "val_bpb": sums["byte_nll"] / max(sums["bytes"], 1.0) / math.log(2)}
