"""Mixture-of-experts FFN: router, dropless and capacity dispatch, balancing, expert parallelism."""

from hybrax.layers.moe.config import MoEConfig
from hybrax.layers.moe.layer import MoE

__all__ = ["MoE", "MoEConfig"]
