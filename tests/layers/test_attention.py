"""The attention mixer: causality through gradients, segment isolation, KV-cache decoding equal
to the full forward pass, jit == eager, and the parameter budget."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybrax.layers.softmax.attention import Attention, AttentionConfig

CONFIG = AttentionConfig(d_model=32, num_heads=4, num_kv_heads=2, head_dim=8)


@pytest.fixture
def layer():
    return Attention(CONFIG, rngs=nnx.Rngs(0))


def x_input(T, B=2, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(B, T, 32)), jnp.float32)


def test_parameter_budget(layer):
    assert sum(x.size for x in jax.tree.leaves(nnx.state(layer, nnx.Param))) == CONFIG.num_params() == 32 * 8 * 12


def test_causal_through_gradients(layer):
    """d y_t / d x_s == 0 for every s > t, and != 0 for s <= t."""
    x = x_input(9, B=1)
    jac = jax.jacrev(lambda x: layer(x))(x)[0, :, :, 0, :, :]  # [t, d, s, d']
    influence = np.abs(np.asarray(jac)).sum(axis=(1, 3))  # [t, s]
    assert np.all(influence[np.triu_indices(9, k=1)] == 0)
    assert np.all(influence[np.tril_indices(9)] > 0)


def test_segments_are_isolated(layer):
    x = x_input(16)
    seg = jnp.asarray([[1] * 10 + [2] * 6] * 2, jnp.int32)
    pos = jnp.asarray([list(range(10)) + list(range(6))] * 2, jnp.int32)
    y = layer(x, segment_ids=seg, positions=pos)
    y_changed = layer(x.at[:, :10].multiply(-3.0), segment_ids=seg, positions=pos)
    np.testing.assert_array_equal(y[:, 10:], y_changed[:, 10:])
    # a packed document gives the same output as the same document alone
    np.testing.assert_allclose(y[:, 10:], layer(x[:, 10:]), atol=1e-5)


@pytest.mark.parametrize("chunks", [[7], [3, 1, 1, 2], [1] * 7])
def test_cached_decoding_matches_full_forward(layer, chunks):
    x = x_input(7)
    full = layer(x)
    cache = layer.init_cache(batch=2, max_len=11)
    outs, start = [], 0
    for n in chunks:
        y, cache = layer(x[:, start:start + n], cache=cache)
        outs.append(y)
        start += n
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5)
    assert int(cache["end"]) == 7


def test_jit_equals_eager(layer):
    x = x_input(13)
    graphdef, state = nnx.split(layer)
    jitted = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
    np.testing.assert_allclose(jitted, layer(x), atol=1e-6)


def test_flops_formula_counts_every_score():
    c = AttentionConfig(d_model=64, num_heads=4, num_kv_heads=4, head_dim=16)
    assert c.flops_per_token(100) - c.flops_per_token(50) == 4 * 50 * 4 * 16
