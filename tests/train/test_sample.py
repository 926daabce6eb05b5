"""Sampling (train/sample.py): greedy decoding from the cache equals greedy decoding by full forward
passes, and a MoMa model routes the prompt and the generated tokens by the modality asked for."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybrax.arch import CausalLM
from hybrax.arch.config import ModelConfig
from hybrax.train.sample import generate
from hybrax.train.tokenizer import ByteTokenizer

MOMA = ModelConfig(d_model=32, num_layers=2, num_heads=2, ffns=["swiglu", "moma"], dtype="float32",
                   moma={"experts_per_modality": [2, 2], "expert_hidden": 16, "routing": "expert_choice"})


def greedy_by_full_forward(model, prompt, steps, modality):
    """Each token the argmax of a full causal forward pass over a fixed-length row (one compile;
    the zeros after position i do not reach it)."""
    ids = list(ByteTokenizer().encode(prompt, bos=True))
    length = len(ids) + steps
    graphdef, params = nnx.split(model)

    @jax.jit
    def logits(tokens):
        return nnx.merge(graphdef, params)(tokens, modality_ids=jnp.full(tokens.shape, modality, jnp.int32))

    for _ in range(steps):
        row = jnp.asarray([ids + [0] * (length - len(ids))], jnp.int32)
        ids.append(int(jnp.argmax(logits(row)[0, len(ids) - 1, :256])))
    return ByteTokenizer().decode(np.asarray(ids[1:]))


@pytest.mark.parametrize("modality", [pytest.param(0, marks=pytest.mark.slow), 1])
def test_cached_greedy_generation_routes_by_the_modality_asked_for(modality):
    model = CausalLM(MOMA, rngs=nnx.Rngs(3))
    sampled = generate(model, "KING:", max_new_tokens=6, temperature=0, modality=modality)
    assert sampled == greedy_by_full_forward(model, "KING:", 6, modality)


def test_the_modality_changes_what_the_moma_layers_compute():
    model = CausalLM(MOMA, rngs=nnx.Rngs(3))
    tokens = jnp.asarray([ByteTokenizer().encode("KING: a speech", bos=True)], jnp.int32)
    graphdef, params = nnx.split(model)
    forward = jax.jit(lambda modality_ids: nnx.merge(graphdef, params)(tokens, modality_ids=modality_ids))
    by = [forward(jnp.full(tokens.shape, m, jnp.int32)) for m in (0, 1)]
    assert float(jnp.max(jnp.abs(by[0] - by[1]))) > 1e-3


def test_a_modality_the_model_cannot_route_is_one_line():
    with pytest.raises(ValueError, match=r"modality=2 must be in \[0, 1\] \(the model's MoMa groups\)"):
        generate(CausalLM(MOMA, rngs=nnx.Rngs(0)), "KING:", max_new_tokens=1, modality=2)
    plain = CausalLM(ModelConfig(d_model=32, num_layers=1, num_heads=2), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="modality=1: the model has no modality-routed layers"):
        generate(plain, "KING:", max_new_tokens=1, modality=1)
