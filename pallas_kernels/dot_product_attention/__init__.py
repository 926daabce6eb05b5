from hybrax.pallas_kernels.dot_product_attention.api import dot_product_attention

__all__ = ["dot_product_attention"]
