"""Sequence parallelism of mLSTM, Gated DeltaNet and sLSTM on 8 fake CPU devices: what the compiled
forward + backward sends between devices, at T and 2T. mLSTM and the delta rule exchange one
record per chunk (an all-gather, whose transpose in the backward is a reduce-scatter of the same
size), independent of T; sLSTM re-shards by all_to_all, which grows with T. That each mixer under
meshes splitting `seq` gives the single-device output and every gradient: test_conformance.py
(sharded)."""

import math
import re

import pytest

from devices import STACK_AND_COLLECTIVES, run_with_devices

SCRIPT = r"""
import json, re
import jax, jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from hybrax.layers.linear.gated_deltanet import GatedDeltaNet, GatedDeltaNetConfig
from hybrax.layers.linear.mlstm import MLSTM, MLSTMConfig
from hybrax.layers.linear.slstm import SLSTM, SLSTMConfig
from hybrax.layers.sharding import spec

D = 32
CONFIGS = {
    "mlstm": (MLSTM, MLSTMConfig(d_model=D, num_heads=2, key_dim=4, value_dim=8, chunk_size=16)),
    "gated_deltanet": (GatedDeltaNet, GatedDeltaNetConfig(d_model=D, num_heads=2, key_dim=4, value_dim=8,
                                                          chunk_size=16)),
    "slstm": (SLSTM, SLSTMConfig(d_model=D, num_heads=4, head_dim=8)),
}

""" + STACK_AND_COLLECTIVES + r"""
B = 2
mesh = jax.make_mesh((4,), ("seq",), axis_types=(jax.sharding.AxisType.Auto,))
results = {}
for name in CONFIGS:
    graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: StackOfTwo(name)), nnx.Param, ...)
    loss = lambda params, x, segment_ids: jnp.sum(nnx.merge(graphdef, params, rest, copy=True)(x, segment_ids) ** 2)
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    for T in (96, 192):
        with jax.set_mesh(mesh):
            sharded = lambda shape, dtype, names: jax.ShapeDtypeStruct(
                shape, dtype, sharding=NamedSharding(mesh, spec(names, shape)))
            text = step.lower(params, sharded((B, T, D), jnp.float32, ("batch", "length", None)),
                              sharded((B, T), jnp.int32, ("batch", "length"))).compile().as_text()
        results[f"{name} T={T}"] = {op: gathered_arrays(text, op) for op in
                                    ("all-gather", "reduce-scatter", "all-to-all", "all-reduce")}
print(json.dumps(results))
"""


@pytest.mark.slow
@pytest.mark.multi_device
def test_what_travels_between_devices():
    """Per layer (a stack of two, seq=4, b=2 rows, H=2 heads, K=4, V=8): mLSTM all-gathers one
    record per local chunk, [4, 2, 2, H K V + H K + 2 H + 5] (C, n, m, the total log-forget, the
    survival flag, first and last segment ids); the delta rule [4, 2, 2, H K (V + K) + 4] (the
    chunk's affine map [F | M] and the ids). The same shapes at T and 2T. sLSTM's all_to_alls carry
    the gate inputs and outputs, and double with T."""
    results = run_with_devices(SCRIPT, devices=8)
    records = {"mlstm": 2 * 4 * 8 + 2 * 4 + 2 * 2 + 5, "gated_deltanet": 2 * 4 * (8 + 4) + 4}
    for name, n in records.items():
        for T in (96, 192):
            gathered = results[f"{name} T={T}"]["all-gather"]
            assert gathered.count(f"f32[4,2,2,{n}]") == 2, (name, T, gathered)
        assert results[f"{name} T=96"] == results[f"{name} T=192"], name
        assert not results[f"{name} T=96"]["all-to-all"], name
    small, large = (results[f"slstm T={T}"]["all-to-all"] for T in (96, 192))
    assert len(small) == len(large) >= 2
    assert numbers(large) == 2 * numbers(small), (small, large)


def numbers(shapes: list[str]) -> int:
    """Total elements of HLO array shapes such as 'f32[2,48,1,4,8]'."""
    return sum(math.prod(int(d) for d in re.findall(r"\d+", shape[shape.index("["):])) for shape in shapes)


@pytest.mark.slow
@pytest.mark.multi_device
def test_seq_alone_equals_one_device():
    """seq=4 with no other axis (the conformance suite's meshes pair seq with data, and with
    tensor): outputs, loss and every gradient within the suite's tolerance of one device."""
    import conformance

    setup = "conformance.SHARDED_MESHES = ({'seq': 4},)"
    results = conformance.run_sharded(["mlstm", "gated_deltanet", "slstm"], setup=setup)
    for name, by_mesh in results.items():
        (mesh, errors), = by_mesh.items()
        assert mesh == "seq=4" and len(errors) > 3, (name, by_mesh)
        assert max(errors.values()) <= conformance.TOLERANCE, (name, errors)
