"""Every registered mixer against the mixer contract (tests/layers/conformance.py): causality,
decoding, packed documents, jit == eager, parameter and FLOP budgets, and sharded == one device on 8
fake CPU devices. A throwaway mixer defined here shows that registering a mixer is enough to have
it checked, and two non-causal ones that the causality check can fail."""

from typing import ClassVar

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import conformance
from hybrax.arch.registry import MIXERS
from hybrax.layers.config import DType, LayerConfig
from hybrax.layers.parameters import logical_param, normal
from hybrax.layers.projection import project
from hybrax.layers.sequence_parallel.layout import default_positions, seq_size


@pytest.mark.parametrize("check", conformance.CHECKS)
@pytest.mark.parametrize("name", MIXERS.names())
def test_mixer_conforms(name, check):
    conformance.CHECKS[check](name)


# ---- a throwaway mixer: registering it is enough to have it checked ----------------------------------

class DecayedSumConfig(LayerConfig):
    """y_t = W_o sum_{s <= t, same document} decay^(t - s) W_v x_s. Parameters: 2 d_model width."""

    tiny: ClassVar[dict] = {"width": 16}

    d_model: int = 256
    width: int = 64
    decay: float = 0.8
    init_std: float = 0.02
    dtype: DType = "float32"
    param_dtype: DType = "float32"

    def num_params(self) -> int:
        return 2 * self.d_model * self.width

    def flops_per_token(self, seq_len: int) -> int:
        """The two projections and the [T, T] weights times v (2 seq_len width)."""
        return 2 * self.num_params() + 2 * seq_len * self.width


class DecayedSum(nnx.Module):
    """The parallel form weighs every pair (t, s) by natural positions, so it takes any row order
    (zigzag under seq > 1: XLA gathers what it needs); decoding carries h_{t-1} [B, width]."""

    def __init__(self, config: DecayedSumConfig, *, rngs: nnx.Rngs):
        c = self.config = config
        self.w_v = logical_param(rngs, normal(c.init_std), (c.d_model, c.width), c.param_dtype, ("embed", "mlp"))
        self.w_o = logical_param(rngs, normal(c.init_std), (c.width, c.d_model), c.param_dtype, ("mlp", "embed"))

    def init_cache(self, batch: int, max_len: int) -> dict:
        del max_len
        return {"state": jnp.zeros((batch, self.config.width), jnp.float32)}

    def weights(self, positions_BxT, segment_ids_BxT):
        """decay^(t - s) where s <= t in the same document, else 0: [B, T, S]."""
        distance = positions_BxT[:, :, None] - positions_BxT[:, None, :]
        seen = (distance >= 0) & (segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :])
        return jnp.where(seen, self.config.decay ** jnp.maximum(distance, 0).astype(jnp.float32), 0.0)

    def __call__(self, x_BxTxD, *, segment_ids=None, positions=None, cache=None):
        c = self.config
        B, T, _ = x_BxTxD.shape
        if cache is not None and segment_ids is not None:
            raise ValueError("segment_ids are not supported while decoding; decode one sequence per row")
        if positions is None:
            positions = default_positions(B, T, seq_size() if cache is None else 1)
        if segment_ids is None:
            segment_ids = jnp.zeros((B, T), jnp.int32)
        v_BxTxW = project("btd,dw->btw", x_BxTxD, self.w_v, c.dtype).astype(jnp.float32)
        h_BxTxW = jnp.einsum("bts,bsw->btw", self.weights(positions, segment_ids), v_BxTxW)
        if cache is not None:   # the carried state, decayed to each new token (positions 0 .. T-1 here)
            h_BxTxW = h_BxTxW + c.decay ** (jnp.arange(T, dtype=jnp.float32) + 1)[:, None] * cache["state"][:, None]
        y_BxTxD = project("btw,wd->btd", h_BxTxW.astype(c.dtype), self.w_o, c.dtype)
        return y_BxTxD if cache is None else (y_BxTxD, {"state": h_BxTxW[:, -1]})


THROWAWAY = "decayed_sum"
# run in the sharded check's subprocess: this file, imported by path, registers its mixer there too
REGISTER = "\n".join([
    "import importlib.util",
    f"spec = importlib.util.spec_from_file_location('test_conformance', {__file__!r})",
    "module = importlib.util.module_from_spec(spec)",
    "spec.loader.exec_module(module)",
    f"conformance.MIXERS.register({THROWAWAY!r}, module.DecayedSumConfig, module.DecayedSum)"])


@pytest.fixture
def registered():
    MIXERS.register(THROWAWAY, DecayedSumConfig, DecayedSum)
    try:
        yield THROWAWAY
    finally:
        MIXERS.unregister(THROWAWAY)


def test_a_registered_mixer_is_checked(registered):
    assert registered in MIXERS.names()
    conformance.check_all(registered)


# ---- negative controls: the causality check can fail ---------------------------------------------------

class Bidirectional(DecayedSum):
    """Reads later tokens of its document: decay^|t - s|."""

    def weights(self, positions_BxT, segment_ids_BxT):
        distance = jnp.abs(positions_BxT[:, :, None] - positions_BxT[:, None, :]).astype(jnp.float32)
        same = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
        return jnp.where(same, self.config.decay ** distance, 0.0)


class PeeksWithoutGradient(DecayedSum):
    """Causal in its gradients, but a discrete choice (which scale to use) reads the last token, as
    a block selection made by a later token would."""

    def __call__(self, x_BxTxD, **kwargs):
        y = super().__call__(x_BxTxD, **kwargs)
        return y * jnp.where(jax.lax.stop_gradient(x_BxTxD[:, -1:, :1]) > 0, 1.0, 2.0)


def test_a_mixer_that_reads_later_tokens_fails_causality():
    with pytest.raises(AssertionError, match="depend on later inputs through gradients"):
        conformance.causal_by_gradient((DecayedSumConfig, Bidirectional))
    with pytest.raises(AssertionError, match="moves y before s"):
        conformance.causal_by_perturbation((DecayedSumConfig, Bidirectional))


def test_a_leak_without_gradient_fails_the_perturbation_check():
    conformance.causal_by_gradient((DecayedSumConfig, PeeksWithoutGradient))
    with pytest.raises(AssertionError, match="moves y before s"):
        conformance.causal_by_perturbation((DecayedSumConfig, PeeksWithoutGradient))


# ---- 7. sharded == one device: every mixer, the throwaway one too, in one subprocess -------------------
# (about 70 s on 2 cores, so `slow`; the quick run keeps one mixer in `make test`, as before)

@pytest.fixture(scope="module")
def sharded():
    return conformance.run_sharded([*MIXERS.names(), THROWAWAY], setup=REGISTER)


@pytest.mark.slow
@pytest.mark.multi_device
@pytest.mark.parametrize("name", [*MIXERS.names(), THROWAWAY])
def test_sharded_equals_one_device(name, sharded):
    conformance.assert_sharded(name, sharded[name])


@pytest.mark.multi_device
def test_sharded_equals_one_device_quick():
    conformance.assert_sharded("linear_attention", conformance.run_sharded(["linear_attention"])["linear_attention"])
