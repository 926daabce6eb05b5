"""Whole models built from a per-layer pattern of mixers and FFNs."""

from arch.causal_lm import CausalLM
from arch.config import ModelConfig
from arch.registry import FFNS, MIXERS

__all__ = ["CausalLM", "ModelConfig", "MIXERS", "FFNS"]
