from hybrax.pallas_kernels.block_sparse_attention.api import block_sparse_attention

__all__ = ["block_sparse_attention"]
