"""`flops_per_token` of the latent-attention layers within 5% of XLA's cost analysis of their forward
pass (issue 19), at the settings the latent-attention sweep trains (configs/sweeps/latent_attention.yaml:
quickstart width, float32) and at the quickstart's length and a longer one."""

import pytest
import yaml

import conformance
from hybrax.arch.registry import MIXERS
from hybrax.configs import DIRECTORY
from hybrax.train.config import load_config

VARIANTS = yaml.safe_load((DIRECTORY / "sweeps" / "latent_attention.yaml").read_text())["grid"]["model"]


@pytest.mark.parametrize("T", [128, 1024])
@pytest.mark.parametrize("variant", [name for name in VARIANTS if name not in ("mha", "gqa")])
def test_flops_per_token_is_within_5_percent_of_xla(variant, T):
    model = load_config("quickstart.yaml", [*VARIANTS[variant], "model.dtype=float32"]).model
    name = model.mixers[0]
    config = MIXERS.config_for(name, model)
    formula, xla = config.flops_per_token(T), conformance.xla_flops_per_token(config, MIXERS.get(name).module, T)
    assert 0.95 <= formula / xla <= 1.05, f"{variant} at T={T}: formula {formula:,} vs XLA {xla:,.0f}"
    print(f"{variant} T={T}: formula / XLA = {formula / xla:.3f}")
