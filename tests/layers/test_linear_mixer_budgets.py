"""The linear mixers' parameter budgets as stated in their docstrings. The FLOP formulas against
XLA's cost analysis (and num_params against the built layer): test_conformance.py."""

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
