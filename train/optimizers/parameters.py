"""What the memory-efficient optimizers share: walking the parameter tree, their state variables,
the matrix view of a parameter, Adam's moment arithmetic and the per-parameter state container.

Parameters are `nnx.Param` variables carrying logical axis names (`out_sharding`). The optimizers
keep, per parameter, a dict of `OptimizerVariable`s whose names say how each array shards
(train.sharding reads them like a parameter's), so under `fsdp` the compressed state is split like
the parameters and no device holds a full copy.
"""

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from hybrax.train.config import ConfigError


class OptimizerVariable(nnx.Variable):
    """An array of optimizer state, with the logical names it shards by."""


class OptimizerState(NamedTuple):
    count: jax.Array        # updates taken (int32)
    per_param: object       # the parameter tree with a dict of OptimizerVariables per parameter


def state_variable(value, names) -> OptimizerVariable:
    return OptimizerVariable(value, out_sharding=tuple(names), eager_sharding=False)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def parameter_leaves(tree):
    """([(path 'blocks/0/ffn/w_up', variable)], treedef) with variables as leaves."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_variable)
    def name(k):
        for attribute in ("key", "idx", "name"):   # DictKey, SequenceKey, GetAttrKey
            if hasattr(k, attribute):
                return str(getattr(k, attribute))
        return str(k)
    return [("/".join(name(k) for k in path), v) for path, v in leaves], treedef


def value(variable):
    return variable.get_value() if isinstance(variable, nnx.Variable) else variable


def names_of(variable) -> tuple:
    names = variable.get_metadata().get("out_sharding") if isinstance(variable, nnx.Variable) else None
    return tuple(names) if names is not None else (None,) * value(variable).ndim


def decays(variable) -> bool:
    """Decoupled weight decay on matrices only (as train.optim's AdamW): norms' scales stay undecayed."""
    return value(variable).ndim >= 2


# ---- the matrix view ------------------------------------------------------------------------------

RANK_NAME = "embed"   # the rank axis of projected state shards over fsdp when the array has no embed axis


@dataclasses.dataclass(frozen=True)
class MatrixView:
    """A parameter as a batch of (m x n) matrices: leading `experts` axes are the batch, and the
    other axes split into rows and columns at the model dimension (`embed` is one side; with no
    `embed` axis, the first axis is the rows). w_q [embed, heads, head_dim] -> 256 x (4*64)."""

    shape: tuple[int, ...]
    names: tuple
    batch: int        # leading batch axes
    split: int        # rows are axes [batch, split), columns [split, ndim)

    @property
    def lead(self) -> tuple[int, ...]:
        return self.shape[:self.batch]

    @property
    def rows(self) -> tuple[int, ...]:
        return self.shape[self.batch:self.split]

    @property
    def columns(self) -> tuple[int, ...]:
        return self.shape[self.split:]

    @property
    def m(self) -> int:
        return math.prod(self.rows)

    @property
    def n(self) -> int:
        return math.prod(self.columns)

    def matrix(self, x):
        return x.reshape(self.lead + (self.m, self.n))

    def unmatrix(self, x):
        return x.reshape(self.shape)

    def side_names(self, side: str) -> tuple:
        return self.names[self.batch:self.split] if side == "rows" else self.names[self.split:]

    def rank_name(self, *other_names) -> str | None:
        """The logical name of a rank axis in an array that also has axes `other_names`."""
        return None if RANK_NAME in other_names else RANK_NAME


def matrix_view(variable) -> MatrixView | None:
    """The matrix view of a parameter, or None for what stays a plain AdamW parameter: vectors
    (norm scales, biases) and embeddings (any axis named `vocab`)."""
    shape, names = value(variable).shape, names_of(variable)
    batch = 1 if names and names[0] == "experts" else 0
    inner = names[batch:]
    if len(inner) < 2 or "vocab" in names:
        return None
    split = len(names) - 1 if inner[-1] == "embed" and inner[0] != "embed" else batch + 1
    return MatrixView(tuple(shape), tuple(names), batch, split)


def subspace_rank(view: MatrixView, rank: int, rank_fraction: float, path: str, key: str) -> int:
    """The rank of one matrix's subspace: `rank`, or (rank 0) rank_fraction of its smaller side,
    rounded up. A rank above the smaller side is a ConfigError naming the matrix."""
    side = min(view.m, view.n)
    if rank == 0:
        return max(1, math.ceil(rank_fraction * side)) if rank_fraction > 0 else 0
    if rank > side:
        raise ConfigError(f"{key}.rank={rank} is larger than {path}'s smaller side {side} (a {view.m} x {view.n} "
                          f"matrix); use a rank <= {side}, or rank: 0 with a rank_fraction")
    return rank


# ---- Adam -----------------------------------------------------------------------------------------

def adam_moments(mu, nu, grad, beta1: float, beta2: float):
    return beta1 * mu + (1 - beta1) * grad, beta2 * nu + (1 - beta2) * grad * grad


def adam_direction(mu, nu, count, beta1: float, beta2: float, eps: float):
    """Bias-corrected m / (sqrt(v) + eps) after `count` updates (count >= 1), as optax.scale_by_adam."""
    count = count.astype(jnp.float32)
    mu_hat = mu / (1 - jnp.asarray(beta1, jnp.float32) ** count)
    nu_hat = nu / (1 - jnp.asarray(beta2, jnp.float32) ** count)
    return mu_hat / (jnp.sqrt(nu_hat) + eps)


def full_moments(variable) -> dict:
    """32-bit Adam moments for one parameter, sharded like it."""
    shape, names = value(variable).shape, names_of(variable)   # two arrays: a train step donates each buffer once
    return {"mu": state_variable(jnp.zeros(shape, jnp.float32), names),
            "nu": state_variable(jnp.zeros(shape, jnp.float32), names)}


def adamw_step(state: dict, grad, count, optim) -> tuple:
    """(AdamW's direction for one parameter from its 32-bit moments, the new moments)."""
    mu, nu = adam_moments(value(state["mu"]), value(state["nu"]), grad, optim.beta1, optim.beta2)
    direction = adam_direction(mu, nu, count, optim.beta1, optim.beta2, optim.eps)
    return direction, {"mu": state["mu"].replace(mu), "nu": state["nu"].replace(nu)}


def apply_per_parameter(init_one, update_one):
    """An optax transformation from per-parameter functions:
        init_one(path, index, param_variable) -> state dict
        update_one(path, index, grad, state dict, param variable, count) -> (update, new state dict)
    (count: this update's number, from 1; update_one applies the learning rate, schedule(count - 1)
    as optax's, and the weight decay)."""
    def init(params):
        leaves, treedef = parameter_leaves(params)
        states = [init_one(path, i, v) for i, (path, v) in enumerate(leaves)]
        return OptimizerState(count=jnp.zeros((), jnp.int32), per_param=jax.tree_util.tree_unflatten(treedef, states))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("this optimizer needs the parameters: optimizer.update(grads, state, params)")
        leaves, treedef = parameter_leaves(updates)
        states = treedef.flatten_up_to(state.per_param)
        param_leaves = treedef.flatten_up_to(params)
        count = state.count + 1
        new_updates, new_states = [], []
        for i, ((path, g), s, p) in enumerate(zip(leaves, states, param_leaves)):
            u, s = update_one(path, i, value(g).astype(jnp.float32), s, p, count)
            new_updates.append(g.replace(u.astype(value(g).dtype)) if isinstance(g, nnx.Variable) else u)
            new_states.append(s)
        return (jax.tree_util.tree_unflatten(treedef, new_updates),
                OptimizerState(count=count, per_param=jax.tree_util.tree_unflatten(treedef, new_states)))

    return optax.GradientTransformation(init, update)
