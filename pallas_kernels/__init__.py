"""Ops with several implementations (reference, xla, Pallas TPU/GPU) behind one signature each."""

from hybrax.pallas_kernels.block_sparse_attention import block_sparse_attention
from hybrax.pallas_kernels.delta_rule import delta_rule
from hybrax.pallas_kernels.dot_product_attention import dot_product_attention
from hybrax.pallas_kernels.grouped_matmul import grouped_matmul
from hybrax.pallas_kernels.linear_attention import linear_attention
from hybrax.pallas_kernels.mlstm import mlstm
from hybrax.pallas_kernels.slstm import slstm

__all__ = ["block_sparse_attention", "delta_rule", "dot_product_attention", "grouped_matmul", "linear_attention",
           "mlstm", "slstm"]
