"""The model's decoding-cache size against its formula (`ModelConfig.decoding_cache_bytes`, the sum
of its layers' `kv_cache_bytes_per_token` and `state_bytes_per_sequence`) for every shipped preset
and the routed structures: the bytes of `CausalLM.init_cache(1, S)` are the formula plus a few
counters per sequence (positions, recursion counts)."""

import jax
import pytest
from flax import nnx

from hybrax.arch import CausalLM
from hybrax.configs import DIRECTORY
from hybrax.train.config import load_config

COUNTERS = 64   # bytes per sequence of positions and counts that no layer reports
CASES = {path.stem: (path.name, []) for path in sorted(DIRECTORY.glob("*.yaml"))} | {
    "mor_token_choice": ("mor.yaml", ["model.recursion.routing=token_choice"]),
    "mor_shared_kv": ("mor.yaml", ["model.recursion.kv_cache=shared"]),
    "depth_routing": ("quickstart.yaml", ["model.depth_routing.capacity=0.5"]),
}


def cache_bytes(model, batch: int, max_len: int) -> int:
    shapes = jax.eval_shape(lambda: model.init_cache(batch, max_len))
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(shapes))


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_decoding_cache_holds_what_the_config_says(case):
    preset, overrides = CASES[case]
    config = load_config(preset, overrides).model
    model = nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0)))
    for max_len in (96, 160):
        measured, formula = cache_bytes(model, 1, max_len), config.decoding_cache_bytes(max_len)
        assert 0 <= measured - formula <= COUNTERS, f"{case} at {max_len}: {measured:,} bytes, formula {formula:,}"
    assert 0 <= cache_bytes(model, 3, 96) - 3 * config.decoding_cache_bytes(96) <= 3 * COUNTERS
    growth = (config.decoding_cache_bytes(160) - config.decoding_cache_bytes(96)) / 64
    assert abs(growth - config.kv_cache_bytes_per_token()) <= 0.02 * growth + 1e-9, (growth, case)
