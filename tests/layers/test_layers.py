"""Norms, embeddings, rotary and SwiGLU against their formulas; parameter budgets."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hybrax.layers.embeddings import TokenEmbedding, apply_rotary
from hybrax.layers.mlp import MLPConfig, SwiGLU
from hybrax.layers.norms import RMSNorm


def n_params(module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def test_rmsnorm_formula():
    norm = RMSNorm(8, eps=1e-6, rngs=nnx.Rngs(0))
    norm.scale[...] = jnp.arange(1.0, 9.0)
    x = np.random.default_rng(0).normal(size=(2, 3, 8)).astype(np.float32)
    expected = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6) * np.arange(1.0, 9.0)
    np.testing.assert_allclose(norm(jnp.asarray(x)), expected, rtol=1e-5)


def test_swiglu_formula_and_budget():
    config = MLPConfig(d_model=8, hidden=24)
    mlp = SwiGLU(config, rngs=nnx.Rngs(0))
    assert n_params(mlp) == config.num_params() == 3 * 8 * 24
    x = np.random.default_rng(0).normal(size=(2, 5, 8)).astype(np.float32)
    g, u, d = (np.asarray(w[...]) for w in (mlp.w_gate, mlp.w_up, mlp.w_down))
    gate = x @ g
    expected = (gate / (1 + np.exp(-gate)) * (x @ u)) @ d
    np.testing.assert_allclose(mlp(jnp.asarray(x)), expected, rtol=1e-4, atol=1e-6)


def test_rotary_depends_only_on_relative_position():
    """<R(p) q, R(s) k> is a function of p - s: shifting both positions changes nothing."""
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)

    def score(p, s):
        rq = apply_rotary(q, jnp.array([[p]]), 10_000.0)
        rk = apply_rotary(k, jnp.array([[s]]), 10_000.0)
        return float(jnp.sum(rq * rk))

    assert abs(score(7, 3) - score(107, 103)) < 1e-4
    assert abs(score(7, 3) - score(3, 7)) > 1e-3  # but it does depend on the offset
    np.testing.assert_allclose(apply_rotary(q, jnp.array([[0]]), 10_000.0), q)  # position 0 is identity
    np.testing.assert_allclose(jnp.linalg.norm(apply_rotary(q, jnp.array([[5]]), 10_000.0)), jnp.linalg.norm(q),
                               rtol=1e-5)  # a rotation keeps the norm


def test_tied_embedding_attend_is_transpose():
    embed = TokenEmbedding(11, 4, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 2, 4)), jnp.float32)
    np.testing.assert_allclose(embed.attend(x), x @ np.asarray(embed.embedding[...]).T, rtol=1e-5)
    np.testing.assert_array_equal(embed(jnp.array([[3]]))[0, 0], embed.embedding[...][3])


def test_every_parameter_has_logical_axes():
    for module in (RMSNorm(4, rngs=nnx.Rngs(0)), SwiGLU(MLPConfig(d_model=4, hidden=8), rngs=nnx.Rngs(0)),
                   TokenEmbedding(7, 4, rngs=nnx.Rngs(0))):
        for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
            axes = var.get_metadata().get("out_sharding")
            assert axes is not None and len(axes) == var[...].ndim, (path, axes)
