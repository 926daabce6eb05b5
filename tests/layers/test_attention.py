"""The attention mixer's own law (the contract itself is checked by tests/layers/test_conformance.py):
its FLOP count grows by 4 H D per key, every score of the causal square being computed."""

from hybrax.layers.softmax.attention import AttentionConfig


def test_flops_formula_counts_every_score():
    c = AttentionConfig(d_model=64, num_heads=4, num_kv_heads=4, head_dim=16)
    assert c.flops_per_token(100) - c.flops_per_token(50) == 4 * 50 * 4 * 16
