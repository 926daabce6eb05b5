"""Auxiliary losses, logged numbers and non-gradient state: the one way a layer hands the train
step something besides its output (MoE balance and router z-loss, k-means commitment; k-means
centroids, expert selection bias).

- `AuxLoss`: a scalar, already multiplied by its weight, that the train step adds to the mean
  token loss and logs under `aux/<path>`.
- `AuxMetric`: a scalar the train step logs under `aux/<path>`; never differentiated.
- `RouterState`: a variable that the forward pass rewrites in training mode (k-means centroids,
  expert bias). It is not an `nnx.Param`: the optimiser never sees it, gradients never reach it,
  and it lives in `TrainState.model_state`, so checkpoints save and restore it with the model.
- `BatchStatistic`: a RouterState holding a sum over the whole global batch that a layer needs
  before its loss can be computed (expert counts for global-batch balancing). With gradient
  accumulation the train step fills it in a statistics pass over all micro-batches before the
  gradient pass: it sets each layer's `batch_statistics` attribute to "collect" (the layer adds its
  share and reports nothing), then to "use"; "own" (the default) means the call is the batch.

Training mode is flax's `deterministic` attribute: layers with routing state are built with
`deterministic=True` (evaluation: no state update, nothing reported) and `model.train()` /
`model.eval()` switch every such layer. Layers report only in training mode, through
`report_loss` / `report_metric`; `forward_with_auxiliaries` runs a model under `nnx.capture` and
returns the reported values by path (e.g. `blocks/1/mixer/commitment`).
"""

import jax
import jax.numpy as jnp
from flax import nnx


class AuxLoss(nnx.Intermediate):
    """A weighted scalar added to the training loss."""


class AuxMetric(nnx.Intermediate):
    """A scalar logged by the train step, not differentiated."""


class RouterState(nnx.Variable):
    """Non-gradient state updated by the forward pass in training mode; checkpointed with the model."""


class BatchStatistic(RouterState):
    """A sum over the global batch, filled by the train step's statistics pass (see above)."""


def _last(_, value):
    return value


def report_loss(module: nnx.Module, name: str, value: jax.Array) -> None:
    """Report a weighted scalar loss (replaces an earlier report of the same name in this call)."""
    module.sow(AuxLoss, name, jnp.asarray(value, jnp.float32), reduce_fn=_last, init_fn=lambda: 0.0)


def report_metric(module: nnx.Module, name: str, value: jax.Array) -> None:
    """Report a scalar to log (replaces an earlier report of the same name in this call)."""
    module.sow(AuxMetric, name, jax.lax.stop_gradient(jnp.asarray(value, jnp.float32)), reduce_fn=_last,
               init_fn=lambda: 0.0)


def _by_path(state: nnx.State) -> dict[str, jax.Array]:
    return {"/".join(str(p) for p in path): variable[...] for path, variable in nnx.to_flat_state(state)}


def forward_with_auxiliaries(model: nnx.Module, *args, **kwargs):
    """(model(*args, **kwargs), losses {path: scalar}, metrics {path: scalar})."""
    output, losses, metrics = nnx.capture(model, AuxLoss, AuxMetric)(*args, **kwargs)
    return output, _by_path(losses), _by_path(metrics)
