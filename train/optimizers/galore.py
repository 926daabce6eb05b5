"""GaLore (Zhao et al., 2024) and Natural GaLore (Das, 2024): Adam in a low-rank gradient subspace.

Every matrix parameter (train.optimizers.parameters.matrix_view: not vectors, not embeddings)
keeps its Adam moments only for its gradient projected onto a rank-r subspace
(train.optimizers.subspace), refreshed from the gradient's SVD every `update_interval` steps (the
moments are kept across refreshes, as in GaLore). The Adam direction is projected back and scaled
by `scale` (alpha); decoupled weight decay acts on the whole weight. Everything else takes AdamW.

Natural GaLore preconditions the low-rank gradient g with the inverse empirical Fisher of the last
`history` low-rank gradients G = [g_t, ..., g_{t-s+1}] (g_t included), by Woodbury's identity:
    (lam I + G G^T)^-1 g = (g - G (lam I + G^T G)^-1 G^T g) / lam,
an s x s solve per matrix, and then runs Adam on it. Here the result is multiplied by lam (Adam's
normalization makes the overall scale irrelevant apart from eps, and this keeps gradient units),
and lam = damping * mean squared norm of the window's gradients, so the damping is relative: the
component along the recent gradients shrinks by about lam / (lam + |g|^2). The window is cleared
when the subspace is refreshed (its old gradients are in the old basis).

Full rank is not AdamW: Adam's per-coordinate normalization is taken in the singular basis, not
the parameter's (tests/train/test_galore.py checks the law that does hold, AdamW in the rotated
coordinates).
"""

import jax
import jax.numpy as jnp

from hybrax.train.optimizers.parameters import (adam_direction, adam_moments, adamw_step, apply_per_parameter,
                                                full_moments, matrix_view, state_variable, subspace_rank, value)
from hybrax.train.optimizers.subspace import Subspace


def natural_gradient(low_rank, history, damping: float, batch: int):
    """lam (lam I + G G^T)^-1 g for each matrix: `low_rank` g (lead + rest), `history` G
    ((s,) + lead + rest, g_t first), lam = damping * mean |G_i|^2 (over the s slots)."""
    lead = low_rank.shape[:batch]
    s = history.shape[0]
    g = jnp.moveaxis(history.reshape((s,) + lead + (-1,)), 0, -2)        # lead + (s, d)
    x = low_rank.reshape(lead + (-1,))
    gram = jnp.einsum("...sd,...td->...st", g, g)
    lam = damping * jnp.trace(gram, axis1=-2, axis2=-1) / s + jnp.finfo(jnp.float32).tiny
    system = gram + lam[..., None, None] * jnp.eye(s, dtype=gram.dtype)
    coefficients = jnp.linalg.solve(system, jnp.einsum("...sd,...d->...s", g, x)[..., None])[..., 0]
    return (x - jnp.einsum("...s,...sd->...d", coefficients, g)).reshape(low_rank.shape)


def galore(optim, schedule, *, natural: bool = False):
    """optim: train.config.OptimConfig; its `galore` (or `natural_galore`) section holds the knobs."""
    knobs, key = (optim.natural_galore, "optim.natural_galore") if natural else (optim.galore, "optim.galore")

    def subspace(path, variable) -> Subspace | None:
        view = matrix_view(variable)
        return None if view is None else Subspace(view, subspace_rank(view, knobs.rank, knobs.rank_fraction, path, key))

    def init_one(path, index, variable):
        sub = subspace(path, variable)
        if sub is None:
            return full_moments(variable)
        state = {"projector": state_variable(jnp.zeros(sub.projector_shape, jnp.float32), sub.projector_names),
                 "mu": state_variable(jnp.zeros(sub.low_rank_shape, jnp.float32), sub.low_rank_names),
                 "nu": state_variable(jnp.zeros(sub.low_rank_shape, jnp.float32), sub.low_rank_names)}
        if natural:
            state["history"] = state_variable(jnp.zeros((knobs.history,) + sub.low_rank_shape, jnp.float32),
                                              (None,) + sub.low_rank_names)
        return state

    def update_one(path, index, grad, state, variable, count):
        lr, param = schedule(count - 1), value(variable)
        decay = optim.weight_decay * param if param.ndim >= 2 else 0.0
        if "projector" not in state:
            direction, state = adamw_step(state, grad, count, optim)
            return -lr * (direction + decay), state
        sub = subspace(path, variable)
        refresh = (count - 1) % knobs.update_interval == 0
        projector = jax.lax.cond(refresh, lambda: sub.fit(grad), lambda: value(state["projector"]))
        low_rank = sub.down(projector, grad)
        new = {"projector": state["projector"].replace(projector)}
        if natural:
            history = jnp.where(refresh, 0.0, value(state["history"]))
            history = jnp.concatenate([low_rank[None], history[:-1]])
            new["history"] = state["history"].replace(history)
            low_rank = natural_gradient(low_rank, history, knobs.damping, sub.view.batch)
        mu, nu = adam_moments(value(state["mu"]), value(state["nu"]), low_rank, optim.beta1, optim.beta2)
        new.update(mu=state["mu"].replace(mu), nu=state["nu"].replace(nu))
        direction = sub.up(projector, adam_direction(mu, nu, count, optim.beta1, optim.beta2, optim.eps))
        return -lr * (knobs.scale * direction + decay), new

    return apply_per_parameter(init_one, update_one)
