"""Sequence parallelism of the linear, gated and state-space mixers (LASP-2 and the convolution halo)
on 8 fake CPU devices: the compiled forward + backward holds one all-gather per layer and direction,
of a size independent of T; bad lengths fail with one line. The carried segment ids of the short
convolution are checked in-process. That each mixer under meshes splitting `seq` gives the
single-device output and every gradient: test_conformance.py (sharded)."""

import jax.numpy as jnp
import numpy as np
import pytest

from hybrax.layers.short_conv import short_causal_conv

from devices import STACK_AND_COLLECTIVES, run_with_devices

COMMON = r"""
import json, re
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from hybrax.layers.linear.gla import GLA, GLAConfig
from hybrax.layers.linear.linear_attention import LinearAttention, LinearAttentionConfig
from hybrax.layers.linear.mamba2 import Mamba2, Mamba2Config
from hybrax.layers.sharding import spec

D = 32
# chunk_size 16 does not divide the zigzag chunks (T / (2 seq) = 12 or 24 tokens at T = 96)
CONFIGS = {
    "linear_attention": (LinearAttention, LinearAttentionConfig(d_model=D, num_heads=2, head_dim=8, chunk_size=16)),
    "gla": (GLA, GLAConfig(d_model=D, num_heads=2, key_dim=8, value_dim=16, gate_rank=4, chunk_size=16)),
    "mamba2": (Mamba2, Mamba2Config(d_model=D, num_heads=4, head_dim=16, state_dim=8, chunk_size=16)),
}

def abstract(make):
    # (graphdef, parameters, rest) of the module make() builds, as shapes only (building eagerly takes seconds)
    return nnx.split(nnx.eval_shape(make), nnx.Param, ...)

def mesh_of(**axes):
    return jax.make_mesh(tuple(axes.values()), tuple(axes), axis_types=(jax.sharding.AxisType.Auto,) * len(axes))
"""

COLLECTIVES = COMMON + STACK_AND_COLLECTIVES + r"""
B = 2
mesh = mesh_of(seq=4)
results = {}
for name in ("linear_attention", "gla", "mamba2"):
    graphdef, params, rest = abstract(lambda: StackOfTwo(name))
    loss = lambda params, x, segment_ids: jnp.sum(nnx.merge(graphdef, params, rest, copy=True)(x, segment_ids) ** 2)
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    for T in (96, 192):
        with jax.set_mesh(mesh):
            sharded = lambda shape, dtype, names: jax.ShapeDtypeStruct(
                shape, dtype, sharding=NamedSharding(mesh, spec(names, shape)))
            text = step.lower(params, sharded((B, T, D), jnp.float32, ("batch", "length", None)),
                              sharded((B, T), jnp.int32, ("batch", "length"))).compile().as_text()
        results[f"{name} T={T}"] = {"all-gather": gathered_arrays(text, "all-gather"),
                                    "collective-permute": len(gathered_arrays(text, "collective-permute"))}
print(json.dumps(results))
"""

ERRORS = COMMON + r"""
results = {}
for name, T in (("gla", 90), ("mamba2", 90), ("mamba2", 16)):
    graphdef, params, rest = abstract(lambda: CONFIGS[name][0](CONFIGS[name][1], rngs=nnx.Rngs(0)))
    call = lambda params, x, s: nnx.merge(graphdef, params, rest)(x, segment_ids=s)
    with jax.set_mesh(mesh_of(data=2, seq=4)):
        try:  # eval_shape: traced, not run
            jax.eval_shape(call, params, jax.ShapeDtypeStruct((2, T, D), jnp.float32),
                           jax.ShapeDtypeStruct((2, T), jnp.int32))
            results[f"{name} T={T}"] = None
        except ValueError as e:
            results[f"{name} T={T}"] = str(e)
print(json.dumps(results))
"""


@pytest.mark.slow
@pytest.mark.multi_device
def test_one_all_gather_per_layer_and_direction():
    """Compiled forward + backward of a stack of two layers (linear attention, GLA, Mamba-2) with
    seq=4, at T and 2T.

    The property: per layer, one all-gather in the forward (the packed buffer of chunk states,
    decays and segment ids, [P, 2, b, H K V + H K' + 4]) and one in the backward (the cotangents of
    the incoming states, [P, 2, b, H, K, V]), neither depending on T. XLA's all-gather combiner may
    merge independent all-gathers into one instruction returning a tuple, so the test counts the
    gathered arrays (the tuple elements), not the instructions, and tells forward from backward by
    their shapes. Mamba-2's convolution halo moves by collective-permutes (2 per layer and direction).
    """
    results = run_with_devices(COLLECTIVES, devices=8)
    # b = 2 rows, P = 4; K' = K for GLA's per-channel gates, 1 for the scalar decays of linear
    # attention (fixed per head) and Mamba-2
    layers = {"linear_attention": (2, 8, 8, 1), "gla": (2, 8, 16, 8), "mamba2": (4, 8, 16, 1)}
    for name, (H, K, V, K_decay) in layers.items():
        forward, backward = f"f32[4,2,2,{H * K * V + H * K_decay + 4}]", f"f32[4,2,2,{H},{K},{V}]"
        for T in (96, 192):
            gathered = results[f"{name} T={T}"]["all-gather"]
            assert sorted(gathered) == sorted([forward, forward, backward, backward]), (name, T, gathered)
        assert results[f"{name} T=96"] == results[f"{name} T=192"]
    assert results["gla T=96"]["collective-permute"] == results["linear_attention T=96"]["collective-permute"] == 0
    assert results["mamba2 T=96"]["collective-permute"] == 2 * 2 * 2


@pytest.mark.multi_device
def test_bad_lengths_fail_with_one_line():
    results = run_with_devices(ERRORS, devices=8)
    expected = ("sequence length 90 must be a multiple of 2 * seq = 8 to split over the mesh axis seq=4 "
                "in zigzag order")
    assert results["gla T=90"] == expected
    assert results["mamba2 T=90"] == expected
    assert results["mamba2 T=16"] == ("chunk length T / (2 * seq) = 2 must be >= conv_width - 1 = 3 for the "
                                      "convolution halo (T=16, seq=4)")


def test_short_conv_carried_inputs_keep_their_segment_ids():
    """Splitting a sequence anywhere and carrying the last W - 1 inputs with their own segment ids
    gives the convolution of the whole sequence."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 20, 3, 5)), jnp.float32)
    weight, bias = jnp.asarray(rng.normal(size=(4, 3, 5)), jnp.float32), jnp.asarray(rng.normal(size=(3, 5)))
    segment_ids = jnp.asarray([[0] * 7 + [1] * 6 + [2] * 7, [3] * 9 + [4] * 11], jnp.int32)
    whole, _ = short_causal_conv(x, weight, bias, segment_ids=segment_ids)
    for split in (7, 8, 9, 10, 13):
        tail, _ = short_causal_conv(x[:, split:], weight, bias, segment_ids=segment_ids[:, split:],
                                    state=x[:, split - 3:split], state_segment_ids=segment_ids[:, split - 3:split])
        np.testing.assert_allclose(tail, whole[:, split:], rtol=1e-6, atol=1e-6)
