from hybrax.pallas_kernels.linear_attention.api import linear_attention

__all__ = ["linear_attention"]
