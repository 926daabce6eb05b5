"""The linear, gated and state-space mixers (linear_attention, gla, mamba2): causality through
gradients, segment isolation, chunked == recurrent decoding, jit == eager, the parameter count and
logical axes. Formulas and bf16: test_linear_mixer_formulas.py; budgets, FLOPs and the registry:
test_linear_mixer_budgets.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybrax.layers.linear.gla import GLA, GLAConfig
from hybrax.layers.linear.linear_attention import LinearAttention, LinearAttentionConfig
from hybrax.layers.linear.mamba2 import Mamba2, Mamba2Config

D = 32
# chunk_size 4 so that a few tokens already cross several chunks of the op
CONFIGS = {
    "linear_attention": (LinearAttention, LinearAttentionConfig(d_model=D, num_heads=2, head_dim=8, chunk_size=4)),
    "lightning_no_decay": (LinearAttention, LinearAttentionConfig(d_model=D, num_heads=2, head_dim=8, decay=False,
                                                                  chunk_size=4)),
    "gla": (GLA, GLAConfig(d_model=D, num_heads=2, key_dim=8, value_dim=16, gate_rank=4, chunk_size=4)),
    "mamba2": (Mamba2, Mamba2Config(d_model=D, num_heads=4, head_dim=16, state_dim=8, chunk_size=4)),
}
MIXERS = ["linear_attention", "gla", "mamba2"]  # the registered ones; the decay-free variant only
# where it takes another path (causality, budget)
KNOWN_AXES = {"embed", "heads", "head_dim", "low_rank", "conv"}


@functools.cache
def build(name):
    """One layer per config for the whole file (building runs many small eager ops); tests do not
    modify it."""
    module, config = CONFIGS[name]
    layer = module(config, rngs=nnx.Rngs(0))
    if name == "gla":  # spread the gates so that the decay differs per channel and step
        layer.w_gate_down[...] = layer.w_gate_down[...] * 50.0
        layer.gate_bias[...] = jnp.linspace(-2.0, 3.0, layer.gate_bias[...].size).reshape(layer.gate_bias[...].shape)
    return layer


def jitted(module):
    """`module(x, segment_ids=..., cache=...)` under one jax.jit (eager op-by-op dispatch is slow)."""
    graphdef, state = nnx.split(module)
    call = jax.jit(lambda state, x, segment_ids, cache: nnx.merge(graphdef, state)(x, segment_ids=segment_ids,
                                                                                    cache=cache))
    return lambda x, segment_ids=None, cache=None: call(state, x, segment_ids, cache)


def x_input(T, B=2, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(B, T, D)), jnp.float32)


def n_params(module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


@pytest.mark.parametrize("name", CONFIGS)
def test_parameter_budget(name):
    assert n_params(build(name)) == CONFIGS[name][1].num_params()


@pytest.mark.parametrize("name", CONFIGS)
def test_causal_through_gradients(name):
    """d y_t / d x_s == 0 for every s > t, and != 0 for s <= t."""
    layer = jitted(build(name))
    x = x_input(9, B=1)
    jac = jax.jit(jax.jacrev(lambda x: layer(x)))(x)[0, :, :, 0, :, :]  # [t, d, s, d']
    influence = np.abs(np.asarray(jac)).sum(axis=(1, 3))  # [t, s]
    assert np.all(influence[np.triu_indices(9, k=1)] == 0)
    assert np.all(influence[np.tril_indices(9)] > 0)


@pytest.mark.parametrize("name", MIXERS)
def test_segments_are_isolated(name):
    layer = jitted(build(name))
    x = x_input(13)
    seg = jnp.asarray([[1] * 6 + [2] * 7, [5] * 13], jnp.int32)
    y = layer(x, segment_ids=seg)
    # a packed document gives the same output as the same document alone
    np.testing.assert_allclose(y[0, 6:], layer(x[:1, 6:])[0], atol=1e-5)
    np.testing.assert_allclose(y[0, :6], layer(x[:1, :6])[0], atol=1e-5)
    np.testing.assert_allclose(y[1], layer(x[1:])[0], atol=1e-5)


@pytest.mark.parametrize("chunks", [[3, 1, 1, 2], [1] * 7])
@pytest.mark.parametrize("name", MIXERS)
def test_cached_decoding_matches_chunked_forward(name, chunks):
    module = build(name)
    layer = jitted(module)
    x = x_input(7)
    full = layer(x)
    cache = module.init_cache(batch=2, max_len=7)
    outs, start = [], 0
    for n in chunks:
        y, cache = layer(x[:, start:start + n], cache=cache)
        outs.append(y)
        start += n
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=2e-5)


@pytest.mark.parametrize("name", MIXERS)
def test_cache_is_constant_in_length(name):
    layer = build(name)
    short, long = layer.init_cache(batch=2, max_len=8), layer.init_cache(batch=2, max_len=4096)
    assert jax.tree.map(jnp.shape, short) == jax.tree.map(jnp.shape, long)
    assert short["state"].dtype == jnp.float32


@pytest.mark.parametrize("name", MIXERS)
def test_jit_equals_eager(name):
    layer = build(name)
    x = x_input(11)
    graphdef, state = nnx.split(layer)
    jitted = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
    np.testing.assert_allclose(jitted, layer(x), atol=1e-6)


@pytest.mark.parametrize("name", MIXERS)
def test_every_parameter_has_logical_axes(name):
    for path, var in nnx.to_flat_state(nnx.state(build(name), nnx.Param)):
        axes = var.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == var[...].ndim and set(axes) <= KNOWN_AXES, (path, axes)


@pytest.mark.parametrize("name", MIXERS)
def test_decoding_refuses_segment_ids(name):
    layer = build(name)
    with pytest.raises(ValueError, match="segment_ids are not supported while decoding"):
        layer(x_input(3), segment_ids=jnp.ones((2, 3), jnp.int32), cache=layer.init_cache(2, 3))

