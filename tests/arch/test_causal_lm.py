"""CausalLM: analytic parameter and FLOP counts against the built model and XLA's cost analysis,
causality of the whole stack, decoding with a cache, and the registry. Each mixer by itself (its
budgets, causality, decoding): tests/layers/test_conformance.py; here, how the model composes
them (hybrid patterns, per-layer settings, the FFNs, embeddings and head)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybrax.arch import CausalLM, MIXERS, ModelConfig

CONFIGS = {
    "tied_mha": ModelConfig(d_model=64, num_layers=2, num_heads=4),
    "untied_gqa": ModelConfig(d_model=96, num_layers=3, num_heads=6, num_kv_heads=2, tie_embeddings=False),
    "odd_shapes": ModelConfig(d_model=48, num_layers=1, num_heads=3, head_dim=10, mlp_hidden=50, vocab_size=300),
    "hybrid_gla": ModelConfig(d_model=32, num_layers=3, num_heads=2, mixers=["gla", "gla", "attention"]),
    "sparse_mixers": ModelConfig(d_model=32, num_layers=4, num_heads=4, num_kv_heads=2,
                                 mixers=["moba", "nsa", "bilevel_routing_attention", "routing_attention"],
                                 moba={"block_size": 4, "top_k": 1}, nsa={"block_size": 4, "top_k": 1, "window": 8},
                                 bilevel_routing_attention={"block_size": 4, "top_k": 1},
                                 routing_attention={"block_size": 4, "top_k": 1}),
    "moe": ModelConfig(d_model=32, num_layers=2, num_heads=2, ffns=["swiglu", "moe"],
                       moe={"num_experts": 4, "expert_hidden": 16, "num_shared_experts": 1}),
}


def real_param_count(model) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("name", CONFIGS)
def test_num_params_matches_model(name):
    config = CONFIGS[name]
    assert config.num_params() == real_param_count(CausalLM(config, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("config,seq_len", [
    (ModelConfig(d_model=256, num_layers=2, num_heads=4), 128),
    (ModelConfig(d_model=128, num_layers=3, num_heads=4, num_kv_heads=2, tie_embeddings=False), 256),
    (ModelConfig(d_model=256, num_layers=4, num_heads=4, mixers=["gla", "gla", "gla", "attention"]), 128),
    # sparse mixers: only the selected blocks count, so FLOPs per token are flat in the length
    (ModelConfig(d_model=256, num_layers=4, num_heads=4,
                 mixers=["moba", "nsa", "bilevel_routing_attention", "routing_attention"]), 1024),
])
def test_flops_per_token_matches_xla_cost_analysis(config, seq_len):
    model = CausalLM(config, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    tokens = jnp.zeros((2, seq_len), jnp.int32)
    compiled = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)).lower(state, tokens).compile()
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    xla_per_token = analysis["flops"] / tokens.size
    ratio = config.flops_per_token(seq_len) / xla_per_token
    assert 0.9 <= ratio <= 1.1, f"formula {config.flops_per_token(seq_len):,} vs XLA {xla_per_token:,.0f}"


def test_model_is_causal():
    """Changing token s changes no logit at positions t < s."""
    config = CONFIGS["untied_gqa"]
    model = CausalLM(config, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, size=(1, 20)), jnp.int32)
    base = model(tokens)
    changed = model(tokens.at[0, 12].set((tokens[0, 12] + 1) % 256))
    np.testing.assert_array_equal(base[:, :12], changed[:, :12])
    assert not np.allclose(base[:, 12:], changed[:, 12:])


@pytest.mark.parametrize("name", ["untied_gqa", "hybrid_gla", "moe"])
def test_cached_decoding_matches_full_forward(name):
    """Prefill then one token at a time through the model's caches: one per layer, of two kinds
    (softmax and recurrent) in the hybrid."""
    config = CONFIGS[name]
    model = CausalLM(config, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 256, size=(2, 9)), jnp.int32)
    full = model(tokens)
    cache = model.init_cache(2, 9)
    prefill, cache = model(tokens[:, :5], cache=cache)
    steps = [prefill]
    for t in range(5, 9):
        logits, cache = model(tokens[:, t:t + 1], cache=cache)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=2e-5)


def test_remat_gives_same_gradients():
    config = CONFIGS["tied_mha"]
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 256, size=(2, 16)), jnp.int32)

    def grads(cfg):
        graphdef, params = nnx.split(CausalLM(cfg, rngs=nnx.Rngs(0)), nnx.Param)
        loss = lambda p: jnp.mean(nnx.merge(graphdef, p)(tokens) ** 2)  # noqa: E731
        return jax.grad(loss)(params)

    plain, remat = grads(config), grads(config.model_copy(update={"remat": True}))
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_every_parameter_has_logical_axes():
    model = CausalLM(CONFIGS["untied_gqa"], rngs=nnx.Rngs(0))
    known = {"embed", "heads", "kv_heads", "head_dim", "mlp", "vocab"}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = var.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == var[...].ndim and set(axes) <= known, (path, axes)


def test_unknown_mixer_is_named():
    with pytest.raises(ValueError, match="unknown mixer 'hyena9'"):
        CausalLM(ModelConfig(d_model=32, num_heads=2, mixers=["hyena9"]), rngs=nnx.Rngs(0))
    assert "attention" in MIXERS.names()


@pytest.mark.parametrize("kwargs,message", [
    (dict(d_model=512, num_heads=6), "model.num_heads=6 does not divide model.d_model=512"),
    (dict(num_heads=4, num_kv_heads=3), "model.num_kv_heads=3 does not divide model.num_heads=4"),
    (dict(d_model=48, num_heads=16), "model.head_dim=3 must be even"),
])
def test_impossible_shapes_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)
