"""Every registered layer's decoding-cache size against its formula, by the law

    bytes of init_cache(B, S) = B (S kv_cache_bytes_per_token + state_bytes_per_sequence) + c

with c a few bytes of counters shared by the batch (the position `end`). Three caches measure the
three terms: (1, 16) and (1, 32) give the bytes per token, (2, 16) the bytes per sequence, and what
remains is c. A layer without a cache (a dense FFN) must report zero for both. In float32 and in
bfloat16 (the keys, values and latents follow the layer's dtype; recurrent states stay float32;
the bfloat16 cases are `slow`, test_mla.py and test_cca.py keep theirs in the fast suite)."""

import dataclasses

import jax
import pytest
from flax import nnx

from hybrax.arch.registry import layer_entry, layer_names
from hybrax.layers.config import TINY_SHAPE

COUNTERS = 16   # at most this many bytes that do not scale with the batch


def cache_bytes(module, batch: int, max_len: int) -> int:
    shapes = jax.eval_shape(lambda: module.init_cache(batch, max_len))
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(shapes))


@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", layer_names())
def test_the_cache_holds_what_its_formula_says(name, dtype):
    entry = layer_entry(name)
    config = entry.config(**entry.config.tiny).bind(dataclasses.replace(TINY_SHAPE, dtype=dtype))
    module = entry.module(config, rngs=nnx.Rngs(0))
    per_token, per_sequence = config.kv_cache_bytes_per_token(), config.state_bytes_per_sequence()
    if not hasattr(module, "init_cache"):
        assert (per_token, per_sequence) == (0, 0), f"{name} has no cache but reports {per_token}, {per_sequence}"
        return
    base = cache_bytes(module, 1, 16)
    measured_per_token = (cache_bytes(module, 1, 32) - base) / 16
    measured_per_sequence = cache_bytes(module, 2, 16) - base - 16 * measured_per_token
    counters = base - 16 * measured_per_token - measured_per_sequence
    assert (measured_per_token, measured_per_sequence) == (per_token, per_sequence), (
        f"{name}: the cache grows by {measured_per_token} bytes per token and holds {measured_per_sequence} per "
        f"sequence; the config says {per_token} and {per_sequence}")
    assert 0 <= counters <= COUNTERS, f"{name}: {counters} bytes that scale with neither the batch nor the length"
