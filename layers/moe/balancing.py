"""Load balancing of the experts: the switch loss at three scopes, the router z-loss, and the
auxiliary-loss-free selection bias.

Switch load-balancing loss (Fedus et al., 2021), over a set of tokens with N k assignments:

    f_i = (assignments to expert i) / (N k)        fraction of the load, not differentiable
    p_i = mean over the tokens of probs_i          differentiable
    L   = E sum_i f_i p_i                          1 at perfect balance

The scope is the set of tokens f and p are taken over (Qiu et al., 2025, "Demons in the Detail"):
`sequence` (each row alone, then the mean over rows), `micro` (all tokens of one forward call, the
micro-batch) or `global` (f from the counts of the whole global batch: every data shard and every
accumulation step, summed before the product; p stays the micro-batch's own mean, so the token-
weighted mean of the reported losses over the accumulation steps is E sum_i f_i^global p_i^global).

Router z-loss (Zoph et al., 2022, ST-MoE): mean over tokens of logsumexp(logits)^2.

Auxiliary-loss-free balancing (Wang et al., 2024): a per-expert bias added to the scores for
selection only, moved after each training forward pass by b_i += rate * sign(mean load - load_i).

Expert choice made causal (MoMa's experts, Mixture-of-Recursions' and Mixture-of-Depths' routers):
training's top-k over a row reads future tokens, so `expert_choice_loss` is a binary cross-entropy
teaching logit > 0 to predict the choice (the rule evaluation and decoding use), with the share of
choices where the two differ.
"""

import jax
import jax.numpy as jnp


def assignment_counts(experts_NxK: jax.Array, num_experts: int) -> jax.Array:
    """Assignments per expert, float32 [E] (before any capacity drop)."""
    return jnp.zeros((num_experts,), jnp.float32).at[experts_NxK.reshape(-1)].add(1.0)


def switch_loss(counts_E: jax.Array, mean_probs_E: jax.Array) -> jax.Array:
    """E sum_i f_i p_i with f = counts / sum(counts) (treated as a constant); batched over leading axes."""
    f_E = jax.lax.stop_gradient(counts_E / jnp.maximum(jnp.sum(counts_E, axis=-1, keepdims=True), 1.0))
    return counts_E.shape[-1] * jnp.sum(f_E * mean_probs_E, axis=-1)


def sequence_switch_loss(experts_BxTxK: jax.Array, probs_BxTxE: jax.Array) -> jax.Array:
    """The switch loss of each row alone, averaged over the rows."""
    E = probs_BxTxE.shape[-1]
    counts_BxE = jax.vmap(lambda e: assignment_counts(e, E))(experts_BxTxK)
    return jnp.mean(switch_loss(counts_BxE, jnp.mean(probs_BxTxE, axis=1)))


def z_loss(logits_NxE: jax.Array) -> jax.Array:
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits_NxE.astype(jnp.float32), axis=-1)))


def updated_bias(bias_E: jax.Array, counts_E: jax.Array, rate: float) -> jax.Array:
    """Raise the bias of under-loaded experts and lower it for over-loaded ones by `rate`."""
    return bias_E + rate * jnp.sign(jnp.mean(counts_E) - counts_E)


def imbalance(counts_E: jax.Array) -> jax.Array:
    """max load / mean load (1 at perfect balance, E when one expert takes everything)."""
    return jnp.max(counts_E) / jnp.maximum(jnp.mean(counts_E), 1e-9)


def expert_choice_loss(logits: jax.Array, chosen: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mean BCE(logits, chosen), share of entries where (logits > 0) != chosen), both over the
    entries where `mask` is set (any shape: [B, T] tokens, [N, E] token-expert pairs)."""
    count = jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)
    target = chosen.astype(jnp.float32)
    bce = jnp.maximum(logits, 0) - logits * target + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    mismatch = jnp.sum(jnp.where(mask, (logits > 0) != chosen, False)) / count
    return jnp.sum(jnp.where(mask, bce, 0.0)) / count, mismatch
