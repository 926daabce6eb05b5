"""Expert parallelism: the experts are split over the mesh axis `expert` and tokens travel to the
device holding their expert with all-to-all collectives inside `jax.shard_map`.

The layer uses this whenever the current mesh (`jax.set_mesh`) has an `expert` axis of size > 1.
Tokens are split over the mesh axes `data`, `fsdp` and `expert` (those of size > 1); weights of
expert e live on expert shard e // (E / ep). Each device:

- dropless: sorts its N_l k assignments by expert, packs the rows for expert shard d into block d
  of a send buffer [ep, N_l k, D] (padded: a block can hold all of them, so nothing is ever
  dropped), exchanges blocks with `all_to_all`, runs its local experts as grouped matmuls over
  the received rows (padding rows carry no group and give 0), and sends the results back the same
  way. XLA:CPU has no `ragged_all_to_all`, so this padded exchange is the one used (and tested)
  here; it moves ep times the rows that a ragged exchange would.
- capacity: builds its [B_l, E, C, D] slots locally, exchanges the expert dimension with one
  `all_to_all` (each device gets [ep B_l, E / ep, C, D]), runs its experts and exchanges back.

Both give the single-device output: the routing is computed outside, on the global arrays.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from layers.moe.capacity import dispatch_and_combine, expert_ffn_slots, gather_slots
from layers.moe.dropless import expert_ffn_grouped

AXIS = "expert"
TOKEN_AXES = ("data", "fsdp", AXIS)


def expert_axis_size() -> int:
    """Size of the `expert` axis of the current mesh (1 without a mesh or without that axis)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or AXIS not in mesh.axis_names:
        return 1
    return mesh.shape[AXIS]


def _layout(num_experts: int, num_groups: int, what: str):
    """(expert shards, token mesh axes), checking that experts and token groups split evenly."""
    mesh = jax.sharding.get_abstract_mesh()
    ep = mesh.shape[AXIS]
    token_axes = tuple(a for a in TOKEN_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
    shards = math.prod(mesh.shape[a] for a in token_axes)
    if num_experts % ep:
        raise ValueError(f"num_experts={num_experts} must be a multiple of the mesh axis expert={ep}")
    if num_groups % shards:
        raise ValueError(f"{what}={num_groups} must be a multiple of {shards}, the devices over mesh axes "
                         f"{token_axes} that split the tokens")
    return ep, token_axes


def _all_to_all(x, split_axis, concat_axis):
    return jax.lax.all_to_all(x, AXIS, split_axis, concat_axis, tiled=True)


def _dropless_local(x_nxD, experts_nxK, weights_nxK, w_gate, w_up, w_down, *, ep, dtype, implementation):
    n, K = experts_nxK.shape
    D = x_nxD.shape[1]
    local_experts = w_gate.shape[0]
    M = n * K
    flat = experts_nxK.reshape(M)
    order = jnp.argsort(flat, stable=True)            # sorted by expert, hence by destination shard
    sorted_expert = flat[order]
    dest = sorted_expert // local_experts
    send_sizes = jnp.zeros((ep,), jnp.int32).at[dest].add(1)
    slot = jnp.arange(M) - (jnp.cumsum(send_sizes) - send_sizes)[dest]
    send_x = jnp.zeros((ep, M, D), x_nxD.dtype).at[dest, slot].set(x_nxD[order // K])
    send_id = jnp.full((ep, M), local_experts, jnp.int32).at[dest, slot].set(sorted_expert % local_experts)
    recv_x = _all_to_all(send_x, 0, 0).reshape(ep * M, D)       # block s came from expert shard s
    recv_id = _all_to_all(send_id, 0, 0).reshape(ep * M)        # local expert, or local_experts = padding
    order_recv = jnp.argsort(recv_id, stable=True)
    group_sizes = jnp.zeros((local_experts,), jnp.int32).at[recv_id].add(1, mode="drop")
    out_sorted = expert_ffn_grouped(recv_x[order_recv], group_sizes, w_gate, w_up, w_down, dtype, implementation)
    out = jnp.zeros_like(out_sorted).at[order_recv].set(out_sorted, unique_indices=True).reshape(ep, M, D)
    back = _all_to_all(out, 0, 0)                                # block d: my rows, computed by shard d
    out_MxD = jnp.zeros((M, D), back.dtype).at[order].set(back[dest, slot], unique_indices=True)
    return jnp.einsum("nk,nkd->nd", weights_nxK.astype(jnp.float32), out_MxD.reshape(n, K, D))


def dropless(x_NxD, experts_NxK, weights_NxK, w_gate, w_up, w_down, *, dtype, implementation=None):
    """Expert-parallel `layers.moe.dropless.dropless`: float32 [N, D]."""
    ep, token_axes = _layout(w_gate.shape[0], x_NxD.shape[0], "tokens per call (batch * length)")
    tokens, weights = P(token_axes, None), P(AXIS, None, None)
    local = functools.partial(_dropless_local, ep=ep, dtype=dtype, implementation=implementation)
    return jax.shard_map(local, in_specs=(tokens, tokens, tokens, weights, weights, weights), out_specs=tokens,
                         check_vma=False)(x_NxD, experts_NxK, weights_NxK, w_gate, w_up, w_down)


def _capacity_local(x_bxTxD, experts_bxTxK, weights_bxTxK, w_gate, w_up, w_down, *, ep, num_experts, capacity,
                    dtype):
    b = x_bxTxD.shape[0]
    dispatch, combine, kept = dispatch_and_combine(experts_bxTxK, weights_bxTxK, num_experts, capacity)
    xe_bxExCxD = gather_slots(dispatch, x_bxTxD, dtype)
    _, E, C, D = xe_bxExCxD.shape
    xe = _all_to_all(xe_bxExCxD.reshape(b, ep, E // ep, C, D), 1, 0)     # [ep b, 1, E / ep, C, D]
    ye = expert_ffn_slots(xe.reshape(ep * b, E // ep, C, D), w_gate, w_up, w_down, dtype)
    ye_bxExCxD = _all_to_all(ye.reshape(ep * b, 1, E // ep, C, D), 0, 1).reshape(b, E, C, D)
    return jnp.einsum("btec,becd->btd", combine, ye_bxExCxD), kept


def capacity(x_BxTxD, experts_BxTxK, weights_BxTxK, w_gate, w_up, w_down, *, capacity: int, dtype):
    """Expert-parallel `layers.moe.capacity.capacity`: (float32 [B, T, D], kept mask [B, T, K])."""
    num_experts = w_gate.shape[0]
    ep, token_axes = _layout(num_experts, x_BxTxD.shape[0], "batch rows")
    rows, weights = P(token_axes, None, None), P(AXIS, None, None)
    local = functools.partial(_capacity_local, ep=ep, num_experts=num_experts, capacity=capacity, dtype=dtype)
    return jax.shard_map(local, in_specs=(rows, rows, rows, weights, weights, weights), out_specs=(rows, rows),
                         check_vma=False)(x_BxTxD, experts_BxTxK, weights_BxTxK, w_gate, w_up, w_down)
