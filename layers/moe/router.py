"""Token-choice top-k routing, in float32.

    logits = x W_router                         [N, E]
    scores = softmax(logits) | sigmoid(logits)  affinities of each token to each expert
    chosen = top_k(scores + bias)               the bias (auxiliary-loss-free balancing) only selects
    weights = scores[chosen]                    optionally divided by their sum (renormalize)

`probs` are the scores normalised over the experts (softmax: the scores themselves; sigmoid:
s / sum_j s_j, as DeepSeek-V3's balance loss), the p of the balance loss.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Routing(NamedTuple):
    experts_NxK: jax.Array     # int32 chosen experts, best first
    weights_NxK: jax.Array     # float32 combine weights (differentiable)
    probs_NxE: jax.Array       # float32 normalised scores (for the balance loss)
    logits_NxE: jax.Array      # float32 router logits (for the z-loss)


def route(logits_NxE: jax.Array, bias_E: jax.Array, *, score: str, top_k: int, renormalize: bool,
          allowed_NxE: jax.Array | None = None) -> Routing:
    """`allowed_NxE` (bool, optional) restricts each token to some experts (MoMa's modality groups):
    the others get score 0 and are never chosen; top_k must not exceed any token's allowed count."""
    logits_NxE = logits_NxE.astype(jnp.float32)
    if score == "softmax":
        masked_NxE = logits_NxE if allowed_NxE is None else jnp.where(allowed_NxE, logits_NxE, -jnp.inf)
        scores_NxE = jax.nn.softmax(masked_NxE, axis=-1)
        probs_NxE = scores_NxE
    elif score == "sigmoid":
        scores_NxE = jax.nn.sigmoid(logits_NxE)
        if allowed_NxE is not None:
            scores_NxE = jnp.where(allowed_NxE, scores_NxE, 0.0)
        probs_NxE = scores_NxE / jnp.sum(scores_NxE, axis=-1, keepdims=True)
    else:
        raise ValueError(f"score={score!r} must be 'softmax' or 'sigmoid'")
    selection_NxE = jax.lax.stop_gradient(scores_NxE) + jax.lax.stop_gradient(bias_E).astype(jnp.float32)
    if allowed_NxE is not None:
        selection_NxE = jnp.where(allowed_NxE, selection_NxE, -jnp.inf)
    _, experts_NxK = jax.lax.top_k(selection_NxE, top_k)
    weights_NxK = jnp.take_along_axis(scores_NxE, experts_NxK, axis=-1)
    if renormalize:
        weights_NxK = weights_NxK / jnp.sum(weights_NxK, axis=-1, keepdims=True)
    return Routing(experts_NxK.astype(jnp.int32), weights_NxK, probs_NxE, logits_NxE)
