"""The block-selection mixers (moba, nsa, bilevel_routing_attention): MoBA with every block
selected == dense causal attention, the shared causal top-k against a loop, and the FLOP laws of
block selection. The contract every mixer keeps (causality through gradients and perturbations,
decoding == parallel, packed documents, jit == eager, budgets, sharding): test_conformance.py."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybrax.layers.sparse import block_selection as bs
from hybrax.layers.softmax.attention import Attention, AttentionConfig
from hybrax.layers.sparse.bilevel_routing_attention import BilevelRoutingConfig
from hybrax.layers.sparse.moba import MoBA, MoBAConfig
from hybrax.layers.sparse.nsa import NSAConfig

D = 32
T = 37  # 5 blocks of 8, the last one partial
IMPLEMENTATION = None  # block_sparse_attention: the best for the backend (xla on CPU)
SHAPES = dict(d_model=D, num_heads=4, num_kv_heads=2, head_dim=8, block_size=8, top_k=2, init_std=0.2,
              implementation=IMPLEMENTATION)
CONFIGS = {
    "moba": MoBAConfig(**SHAPES),
    "nsa": NSAConfig(**SHAPES, window=8, compress_block=4),
    "bilevel_routing_attention": BilevelRoutingConfig(**SHAPES),
}


def x_input(T, B=2, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(B, T, D)), jnp.float32)


def test_moba_with_every_block_selected_is_dense_attention():
    """top_k >= the number of blocks: every past block plus the current one, i.e. causal attention."""
    config = MoBAConfig(**{**SHAPES, "top_k": 5})
    moba = MoBA(config, rngs=nnx.Rngs(4))
    attention = Attention(AttentionConfig(d_model=D, num_heads=4, num_kv_heads=2, head_dim=8), rngs=nnx.Rngs(5))
    for weight in ("w_q", "w_k", "w_v", "w_o"):
        getattr(attention, weight)[...] = getattr(moba, weight)[...]
    x = x_input(T)
    np.testing.assert_allclose(moba(x), attention(x), atol=1e-6, rtol=0)


def test_causal_top_k_blocks_matches_a_loop():
    rng = np.random.default_rng(6)
    B, H, N, top_k = 2, 3, 7, 3
    scores = rng.normal(size=(B, H, N, N)).astype(np.float32)
    valid = rng.random((B, N, N)) < 0.7
    got = np.asarray(bs.causal_top_k_blocks(jnp.asarray(scores), jnp.arange(N), top_k, jnp.asarray(valid)))
    for b, h, n in np.ndindex(B, H, N):
        candidates = [m for m in range(n) if valid[b, n, m]]
        best = sorted(candidates, key=lambda m: -scores[b, h, n, m])[:top_k]
        np.testing.assert_array_equal(got[b, h, n], best + [-1] * (top_k - len(best)) + [n])


@pytest.mark.parametrize("name", CONFIGS)
def test_flops_count_only_the_selected_blocks(name):
    """Past (top_k + 1) blocks the attention term stops growing with the sequence: doubling it adds
    only the routing (and for nsa the compressed tokens); one more selected block adds 4 H D block."""
    config = CONFIGS[name]
    H, Dh, b = config.num_heads, config.head_dim, config.block_size
    growth = config.flops_per_token(4096) - config.flops_per_token(2048)
    routing = 2 * H * Dh * (4096 - 2048) // b // b
    if name == "nsa":
        compressed = (4096 - 2048) // config.compress_block
        routing = 2 * H * Dh * (4096 // 4 - 2048 // 4) // b
        assert growth == 4 * H * Dh * compressed + routing
    else:
        assert growth == routing
    more = type(config)(**{**config.__dict__, "top_k": config.top_k + 1})
    assert more.flops_per_token(4096) - config.flops_per_token(4096) == 4 * H * Dh * b
