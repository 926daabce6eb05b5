"""Routing tokens past layers at fixed shapes, shared by Mixture-of-Recursions and Mixture-of-Depths
(arch/mixture_of_recursions.py, arch/mixture_of_depths.py).

A routed layer takes a fixed number of a row's tokens: `compact` reorders the row so the chosen
tokens come first, in order of position, `gather_rows` gives them as a shorter sequence (with their
own positions and segment ids), and `scatter_add_rows` adds their updates back. Expert choice
(`top_k_mask`) reads the whole row, so it is not causal; layers/moe/balancing.expert_choice_loss is
the auxiliary loss that teaches the router's logit > 0 to predict the choice (what evaluation and
decoding use)."""

import jax
import jax.numpy as jnp


def compact(wanted_BxT, slots: int):
    """(indices int32 [B, slots], kept bool [B, slots]): the row's wanted tokens first, in order of
    position, then the others; kept marks the wanted ones among the first `slots`."""
    T = wanted_BxT.shape[1]
    t = jnp.arange(T, dtype=jnp.int32)
    order_BxT = jnp.argsort(jnp.where(wanted_BxT, t, T + t), axis=1).astype(jnp.int32)
    index_BxC = order_BxT[:, :slots]
    return index_BxC, jnp.take_along_axis(wanted_BxT, index_BxC, axis=1)


def gather_rows(x_BxT___, index_BxC):
    """x's rows at index, per batch row."""
    index = index_BxC.reshape(index_BxC.shape + (1,) * (x_BxT___.ndim - 2))
    return jnp.take_along_axis(x_BxT___, index, axis=1)


def scatter_add_rows(x_BxT___, index_BxC, update_BxC___):
    """x with update added at rows index (distinct within each batch row)."""
    return jax.vmap(lambda x, i, u: x.at[i].add(u))(x_BxT___, index_BxC, update_BxC___.astype(x_BxT___.dtype))


def top_k_mask(score_BxT, k: int):
    """bool [B, T]: the k highest scores of each row (ties: the earlier position)."""
    _, index_BxK = jax.lax.top_k(score_BxT, k)
    return jnp.zeros(score_BxT.shape, bool).at[jnp.arange(score_BxT.shape[0])[:, None], index_BxK].set(True)
