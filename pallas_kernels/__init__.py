"""Ops with several implementations (reference, xla, Pallas TPU/GPU) behind one signature each."""

from pallas_kernels.block_sparse_attention import block_sparse_attention
from pallas_kernels.dot_product_attention import dot_product_attention
from pallas_kernels.grouped_matmul import grouped_matmul
from pallas_kernels.linear_attention import linear_attention

__all__ = ["block_sparse_attention", "dot_product_attention", "grouped_matmul", "linear_attention"]
