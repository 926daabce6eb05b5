"""The linear, gated, state-space and recurrent mixers (linear_attention, gla, mamba2, mlstm,
gated_deltanet, slstm): what only they
promise: a recurrent cache whose size does not grow with the length, decoding that refuses packed
documents, and the decay-free variant of linear attention (another path of the op) as causal as
the registered one. The contract every mixer keeps (causality, decoding == parallel, packed
documents, jit == eager, budgets, sharding): test_conformance.py. Formulas and bf16:
test_linear_mixer_formulas.py; parameter budgets: test_linear_mixer_budgets.py."""

import jax
import jax.numpy as jnp
import pytest

import conformance
from hybrax.layers.config import TINY_SHAPE
from hybrax.layers.linear.linear_attention import LinearAttention, LinearAttentionConfig

MIXERS = ["linear_attention", "gla", "mamba2", "mlstm", "gated_deltanet", "slstm"]


@pytest.mark.parametrize("name", MIXERS)
def test_cache_is_constant_in_length(name):
    layer = conformance.build(name)
    short, long = layer.init_cache(batch=2, max_len=8), layer.init_cache(batch=2, max_len=4096)
    assert jax.tree.map(jnp.shape, short) == jax.tree.map(jnp.shape, long)
    cell = [short[key] for key in ("state", "c", "n", "m", "h") if key in short]
    assert cell and all(x.dtype == jnp.float32 for x in cell)


@pytest.mark.parametrize("name", MIXERS)
def test_decoding_refuses_segment_ids(name):
    layer = conformance.build(name)
    with pytest.raises(ValueError, match="segment_ids are not supported while decoding"):
        layer(conformance.inputs(3), segment_ids=jnp.ones((2, 3), jnp.int32), cache=layer.init_cache(2, 3))


def test_decay_free_linear_attention_is_causal():
    config = LinearAttentionConfig(decay=False).bind(TINY_SHAPE)
    conformance.causal((config, LinearAttention))
