"""The linear mixers' budgets: parameter formulas as stated in the docstrings, FLOP formulas against
XLA's cost analysis of one forward pass, and the mixers built by the registry into a hybrid model
that decodes from its cache."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from hybrax.arch import MIXERS, ModelConfig
from hybrax.layers.linear.gla import GLAConfig
from hybrax.layers.linear.linear_attention import LinearAttentionConfig
from hybrax.layers.linear.mamba2 import Mamba2Config


def test_parameter_budgets_match_the_docstrings():
    d = 64
    gla = GLAConfig(d_model=d, num_heads=4, key_dim=8, value_dim=16)
    assert gla.num_params() == 4 * d * d + 25.5 * d
    lightning = LinearAttentionConfig(d_model=d, num_heads=4, head_dim=16)
    assert lightning.num_params() == 5 * d * d + d
    mamba = Mamba2Config(d_model=d, num_heads=2, head_dim=64, state_dim=16)
    E, N, H = 128, 16, 2
    assert mamba.num_params() == d * (2 * E + 2 * N + H) + 5 * (E + 2 * N) + 3 * H + E + E * d


def xla_flops_per_token(layer, x) -> float:
    graphdef, state = nnx.split(layer)
    compiled = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, x).compile()
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return analysis["flops"] / (x.shape[0] * x.shape[1])


@pytest.mark.parametrize("name", ["linear_attention", "gla", "mamba2"])
def test_flops_per_token_matches_xla_cost_analysis(name, seq_len=128):
    """One forward pass of the mixer at the quickstart shape (d_model 256, 4 heads, 128 tokens).

    Short sequences only: XLA counts a while loop's body once, so its count falls below the work
    done once the op scans over blocks of tokens (T >= 1024). For GLA it also counts the op's exact
    fallback branch, about 8% over the factored path that the formula counts."""
    config = MIXERS.config_for(name, ModelConfig(d_model=256, num_heads=4))
    layer = MIXERS.get(name).module(config, rngs=nnx.Rngs(0))
    xla = xla_flops_per_token(layer, jnp.zeros((2, seq_len, 256), jnp.float32))
    ratio = config.flops_per_token(seq_len) / xla
    assert 0.9 <= ratio <= 1.1, f"formula {config.flops_per_token(seq_len):,} vs XLA {xla:,.0f}"
