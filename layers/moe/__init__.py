"""Mixture-of-experts FFN: router, dropless and capacity dispatch, balancing, expert parallelism."""

from layers.moe.config import MoEConfig
from layers.moe.layer import MoE

__all__ = ["MoE", "MoEConfig"]
