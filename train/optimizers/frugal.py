"""FRUGAL (Zmushko et al., 2025): full-rank updates by gradient splitting.

Each matrix parameter's gradient splits into a state-full part, updated by AdamW with moments only
for that part, and the rest, updated by a state-free rule (signSGD, or SGD) at its own learning
rate. The state-full part is chosen every `update_interval` steps:
- `columns`: a random `density` share of the matrix's columns (train.optimizers.parameters'
  matrix view): Adam moments of m x k, the residual is the other columns. Columns are drawn from a
  key folded from the parameter's index and the step, so a resumed run draws the same ones.
- `svd`: GaLore's subspace of rank `density` x the smaller side (train.optimizers.subspace): the
  residual is G - P P^T G.
At each refresh the moments restart from zero, with Adam's bias correction counted from the
refresh, as the new part's old coordinates mean nothing. Non-matrix parameters (norm scales,
embeddings) take AdamW (`rest: adamw`, the paper's choice) or the state-free rule (`state_free`).
Decoupled weight decay acts on whole matrices at the state-full learning rate.

Laws (tests/train/test_frugal.py): density 1 with `columns` is AdamW; density 0 with
`rest: state_free` is signSGD.
"""

import math

import jax
import jax.numpy as jnp

from hybrax.train.optimizers.parameters import (adam_direction, adam_moments, adamw_step, apply_per_parameter,
                                                full_moments, matrix_view, state_variable, value)
from hybrax.train.optimizers.subspace import Subspace


def random_columns(lead: tuple[int, ...], n: int, k: int, index: int, count):
    """k sorted column indices out of n for each matrix of `lead`, drawn from (parameter index, step)."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(0), index), count)
    order = jnp.argsort(jax.random.uniform(key, lead + (n,)), axis=-1)
    return jnp.sort(order[..., :k], axis=-1).astype(jnp.int32)


def _scatter_columns(values, columns, n: int):
    """values (lead + (m, k)) into zeros (lead + (m, n)) at `columns` (lead + (k,))."""
    lead = columns.shape[:-1]
    flat_v = values.reshape((-1,) + values.shape[-2:])
    flat_c = columns.reshape((-1, columns.shape[-1]))
    out = jax.vmap(lambda v, c: jnp.zeros((v.shape[0], n), v.dtype).at[:, c].set(v))(flat_v, flat_c)
    return out.reshape(lead + out.shape[-2:])


def frugal(optim, schedule):
    """optim: train.config.OptimConfig with its `frugal` section."""
    knobs = optim.frugal
    free_scale = (knobs.state_free_lr or optim.lr) / optim.lr

    def state_free(grad):
        return jnp.sign(grad) if knobs.state_free == "sign" else grad

    def split(variable):
        """(matrix view, state-full size) or None for a non-matrix parameter."""
        view = matrix_view(variable)
        if view is None:
            return None
        side = view.n if knobs.projection == "columns" else min(view.m, view.n)
        return view, math.ceil(knobs.density * side)

    def init_one(path, index, variable):
        parts = split(variable)
        if parts is None:
            return full_moments(variable) if knobs.rest == "adamw" else {}
        view, size = parts
        if size == 0:
            return {}
        if knobs.projection == "svd":
            sub = Subspace(view, size)
            return {"projector": state_variable(jnp.zeros(sub.projector_shape, jnp.float32), sub.projector_names),
                    "mu": state_variable(jnp.zeros(sub.low_rank_shape, jnp.float32), sub.low_rank_names),
                    "nu": state_variable(jnp.zeros(sub.low_rank_shape, jnp.float32), sub.low_rank_names)}
        rows = view.side_names("rows")
        names = view.names[:view.batch] + rows + (view.rank_name(*rows),)
        shape = view.lead + view.rows + (size,)
        return {"columns": state_variable(jnp.zeros(view.lead + (size,), jnp.int32), view.names[:view.batch] + (None,)),
                "mu": state_variable(jnp.zeros(shape, jnp.float32), names),
                "nu": state_variable(jnp.zeros(shape, jnp.float32), names)}

    def update_one(path, index, grad, state, variable, count):
        lr, param = schedule(count - 1), value(variable)
        decay = optim.weight_decay * param if param.ndim >= 2 else 0.0
        if "mu" not in state:                     # wholly state-free
            return -lr * (free_scale * state_free(grad) + decay), state
        if "projector" not in state and "columns" not in state:
            direction, state = adamw_step(state, grad, count, optim)
            return -lr * (direction + decay), state
        view, size = split(variable)
        since_refresh = (count - 1) % knobs.update_interval + 1
        refresh = since_refresh == 1
        mu, nu = (jnp.where(refresh, 0.0, value(state[k])) for k in ("mu", "nu"))
        if "projector" in state:
            sub = Subspace(view, size)
            projector = jax.lax.cond(refresh, lambda: sub.fit(grad), lambda: value(state["projector"]))
            low_rank = sub.down(projector, grad)
            mu, nu = adam_moments(mu, nu, low_rank, optim.beta1, optim.beta2)
            direction = sub.up(projector, adam_direction(mu, nu, since_refresh, optim.beta1, optim.beta2, optim.eps))
            residual = grad - sub.up(projector, low_rank)
            new = {"projector": state["projector"].replace(projector)}
        else:
            columns = jax.lax.cond(refresh, lambda: random_columns(view.lead, view.n, size, index, count),
                                   lambda: value(state["columns"]))
            matrix = view.matrix(grad)
            chosen = jnp.take_along_axis(matrix, columns[..., None, :], axis=-1).reshape(mu.shape)
            mu, nu = adam_moments(mu, nu, chosen, optim.beta1, optim.beta2)
            adam = adam_direction(mu, nu, since_refresh, optim.beta1, optim.beta2, optim.eps)
            direction = view.unmatrix(_scatter_columns(adam.reshape(view.lead + (view.m, size)), columns, view.n))
            # 1 on the chosen columns, 0 elsewhere
            kept = _scatter_columns(jnp.ones(view.lead + (1, size), grad.dtype), columns, view.n)
            residual = view.unmatrix(matrix * (1 - kept))
            new = {"columns": state["columns"].replace(columns)}
        new.update(mu=state["mu"].replace(mu), nu=state["nu"].replace(nu))
        return -lr * (direction + free_scale * state_free(residual) + decay), new

    return apply_per_parameter(init_one, update_one)
