from hybrax.pallas_kernels.mlstm.api import mlstm

__all__ = ["mlstm"]
