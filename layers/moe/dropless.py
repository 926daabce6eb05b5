"""Dropless dispatch: sort the N k assignments by expert and run the experts as grouped matmuls
over the sorted rows (`pallas_kernels.grouped_matmul`), so every assignment is computed whatever
the load; then unsort and combine with the weights.

    order      = argsort(experts, stable)        rows of expert 0 first, token order within an expert
    rows       = x[order // k]                   [N k, D]
    group_size = assignments per expert          [E]
    h          = silu(gmm(rows, W_gate)) * gmm(rows, W_up);  out = gmm(h, W_down)
    y_n        = sum_j weights[n, j] out[position of assignment (n, j)]

Under a mesh the whole dispatch runs per device (layers/partitioned.py): each device sorts its own
rows (tokens over data, fsdp) and runs the grouped matmuls on them with its group sizes, with the
experts' hidden width F split over tensor (partial outputs summed); a `pallas_call` inside is never
handed a global array. Expert parallelism (mesh axis expert > 1) is expert_parallel.py.
"""

import functools

import jax
import jax.numpy as jnp

from hybrax.layers.moe.balancing import assignment_counts
from hybrax.layers.partitioned import partitioned
from hybrax.pallas_kernels.grouped_matmul import grouped_matmul


def sort_by_expert(experts_NxK: jax.Array, num_experts: int):
    """(order [N k] of the flat assignments sorted by expert, token of each sorted row, group sizes [E])."""
    order = jnp.argsort(experts_NxK.reshape(-1), stable=True)
    group_sizes = assignment_counts(experts_NxK, num_experts).astype(jnp.int32)
    return order, order // experts_NxK.shape[1], group_sizes


def expert_ffn_grouped(rows_MxD, group_sizes_E, w_gate, w_up, w_down, dtype, implementation):
    """SwiGLU of each sorted row with its group's expert, in `dtype` with float32 accumulation."""
    dtype = jnp.dtype(dtype)

    def gmm(lhs, rhs):
        return grouped_matmul(lhs.astype(dtype), rhs.astype(dtype), group_sizes_E,
                              preferred_element_type=jnp.float32, implementation=implementation)

    h_MxF = (jax.nn.silu(gmm(rows_MxD, w_gate)) * gmm(rows_MxD, w_up)).astype(dtype)
    return gmm(h_MxF, w_down)


def dropless(x_NxD, experts_NxK, weights_NxK, w_gate, w_up, w_down, *, dtype, implementation=None):
    """float32 [N, D]: the routed output with nothing dropped."""
    local = functools.partial(_dropless, dtype=dtype, implementation=implementation)
    rows, gate_up, down = ("batch", None), (None, None, "mlp"), (None, "mlp", None)
    return partitioned(local, (rows, rows, rows, gate_up, gate_up, down), rows, summed=("mlp",))(
        x_NxD, experts_NxK, weights_NxK, w_gate, w_up, w_down)


def _dropless(x_NxD, experts_NxK, weights_NxK, w_gate, w_up, w_down, *, dtype, implementation):
    N, K = experts_NxK.shape
    order, token, group_sizes = sort_by_expert(experts_NxK, w_gate.shape[0])
    out_MxD = expert_ffn_grouped(x_NxD[token], group_sizes, w_gate, w_up, w_down, dtype, implementation)
    unsorted_NxKxD = jnp.zeros_like(out_MxD).at[order].set(out_MxD, unique_indices=True).reshape(N, K, -1)
    return jnp.einsum("nk,nkd->nd", weights_NxK.astype(jnp.float32), unsorted_NxKxD)
