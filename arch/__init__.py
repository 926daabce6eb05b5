"""Whole models built from a per-layer pattern of mixers and FFNs."""

from hybrax.arch.causal_lm import CausalLM
from hybrax.arch.config import ModelConfig
from hybrax.arch.registry import FFNS, MIXERS

__all__ = ["CausalLM", "ModelConfig", "MIXERS", "FFNS"]
