from hybrax.pallas_kernels.slstm.api import slstm

__all__ = ["slstm"]
