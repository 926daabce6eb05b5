"""Expert parallelism: the experts are split over the mesh axis `expert` and tokens travel to the
device holding their expert with all-to-all collectives inside `jax.shard_map`.

The layer uses this whenever the current mesh (`jax.set_mesh`) has an `expert` axis of size > 1.
Tokens are split over the mesh axes `data`, `fsdp` and `expert` (those of size > 1); weights of
expert e live on expert shard e // (E / ep). Each device:

- dropless: sorts its N_l k assignments by expert and sends each expert shard its rows, runs its
  local experts as grouped matmuls over the received rows (padding rows carry no group and give 0),
  and sends the results back the same way. Two exchanges (`MoEConfig.exchange`):
  - `padded` (default): the rows for shard d go to block d of a send buffer [ep, N_l k, D] (a block
    can hold all of them, so nothing is ever dropped) and one `all_to_all` swaps the blocks. It
    moves ep times the rows that are needed; it is the one XLA:CPU can run, and the tested one.
  - `ragged`: `jax.lax.ragged_all_to_all` moves exactly the rows (sizes exchanged first with one
    all_gather of [ep] counts). XLA:CPU has no such op, so here it is only compiled for a TPU
    topology in the tests; its numbers are unverified until it runs on a GPU or TPU.
- capacity: builds its [B_l, E, C, D] slots locally, exchanges the expert dimension with one
  `all_to_all` (each device gets [ep B_l, E / ep, C, D]), runs its experts and exchanges back.

Both give the single-device output: the routing is computed outside, on the global arrays.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from hybrax.layers.moe.capacity import dispatch_and_combine, expert_ffn_slots, gather_slots
from hybrax.layers.moe.dropless import expert_ffn_grouped, sort_by_expert

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


def _local_experts(rows_RxD, ids_R, w_gate, w_up, w_down, dtype, implementation):
    """Received rows through their local expert (id = local expert; id >= E_l: padding, gives 0),
    float32 [R, D] in the received order."""
    local_experts = w_gate.shape[0]
    order = jnp.argsort(ids_R, stable=True)
    group_sizes = jnp.zeros((local_experts,), jnp.int32).at[ids_R].add(1, mode="drop")
    out_sorted = expert_ffn_grouped(rows_RxD[order], group_sizes, w_gate, w_up, w_down, dtype, implementation)
    return jnp.zeros_like(out_sorted).at[order].set(out_sorted, unique_indices=True)


def _padded_exchange(rows_MxD, sorted_expert_M, local_experts, ep, compute):
    """Rows sorted by expert -> their experts' outputs, float32 [M, D], through blocks of M rows."""
    M, D = rows_MxD.shape
    dest = sorted_expert_M // local_experts
    send_sizes = jnp.zeros((ep,), jnp.int32).at[dest].add(1)
    slot = jnp.arange(M) - (jnp.cumsum(send_sizes) - send_sizes)[dest]
    send_x = jnp.zeros((ep, M, D), rows_MxD.dtype).at[dest, slot].set(rows_MxD)
    send_id = jnp.full((ep, M), local_experts, jnp.int32).at[dest, slot].set(sorted_expert_M % local_experts)
    recv_x = _all_to_all(send_x, 0, 0).reshape(ep * M, D)       # block s came from expert shard s
    recv_id = _all_to_all(send_id, 0, 0).reshape(ep * M)        # local expert, or local_experts = padding
    back = _all_to_all(compute(recv_x, recv_id).reshape(ep, M, D), 0, 0)   # block d: my rows, done by shard d
    return back[dest, slot]


def _ragged_exchange(rows_MxD, sorted_expert_M, local_experts, ep, compute):
    """As `_padded_exchange`, moving only the rows each shard needs (ragged_all_to_all)."""
    M, D = rows_MxD.shape
    dest = sorted_expert_M // local_experts
    send_sizes = jnp.zeros((ep,), jnp.int32).at[dest].add(1)
    send_offsets = jnp.cumsum(send_sizes) - send_sizes                   # in my sorted rows
    sizes = jax.lax.all_gather(send_sizes, AXIS)                        # [source, destination]
    offsets_at_destination = jnp.cumsum(sizes, axis=0) - sizes          # source's block in destination's buffer
    offsets_at_source = jnp.cumsum(sizes, axis=1) - sizes               # source's rows for destination
    me = jax.lax.axis_index(AXIS)
    recv_sizes = sizes[:, me]

    def exchange(operand, output, input_offsets, send, output_offsets, recv):
        return jax.lax.ragged_all_to_all(operand, output, input_offsets, send, output_offsets, recv, axis_name=AXIS)

    recv_x = exchange(rows_MxD, jnp.zeros((ep * M, D), rows_MxD.dtype), send_offsets, send_sizes,
                      offsets_at_destination[me], recv_sizes)
    recv_id = exchange(sorted_expert_M % local_experts, jnp.full((ep * M,), local_experts, jnp.int32), send_offsets,
                       send_sizes, offsets_at_destination[me], recv_sizes)
    out = compute(recv_x, recv_id)
    return exchange(out, jnp.zeros((M, D), out.dtype), offsets_at_destination[:, me], recv_sizes,
                    offsets_at_source[:, me], send_sizes)


EXCHANGES = {"padded": _padded_exchange, "ragged": _ragged_exchange}


def _dropless_local(x_nxD, experts_nxK, weights_nxK, w_gate, w_up, w_down, *, ep, dtype, implementation, exchange):
    n, K = experts_nxK.shape
    D = x_nxD.shape[1]
    M = n * K
    order, token, _ = sort_by_expert(experts_nxK, w_gate.shape[0] * ep)   # by expert, hence by destination

    def compute(rows, ids):
        return _local_experts(rows, ids, w_gate, w_up, w_down, dtype, implementation)

    out_sorted = EXCHANGES[exchange](x_nxD[token], experts_nxK.reshape(M)[order], w_gate.shape[0], ep, compute)
    out_MxD = jnp.zeros((M, D), out_sorted.dtype).at[order].set(out_sorted, unique_indices=True)
    return jnp.einsum("nk,nkd->nd", weights_nxK.astype(jnp.float32), out_MxD.reshape(n, K, D))


def dropless(x_NxD, experts_NxK, weights_NxK, w_gate, w_up, w_down, *, dtype, implementation=None,
             exchange="padded"):
    """Expert-parallel `layers.moe.dropless.dropless`: float32 [N, D]."""
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange={exchange!r} must be one of {sorted(EXCHANGES)}")
    ep, token_axes = _layout(w_gate.shape[0], x_NxD.shape[0], "tokens per call (batch * length)")
    tokens, weights = P(token_axes, None), P(AXIS, None, None)
    local = functools.partial(_dropless_local, ep=ep, dtype=dtype, implementation=implementation, exchange=exchange)
    return jax.shard_map(local, in_specs=(tokens, tokens, tokens, weights, weights, weights), out_specs=tokens,
                         check_vma=False)(x_NxD, experts_NxK, weights_NxK, w_gate, w_up, w_down)


def _capacity_local(x_bxTxD, experts_bxTxK, weights_bxTxK, w_gate, w_up, w_down, *, ep, num_experts, capacity,
                    dtype):
    dispatch, combine, kept = dispatch_and_combine(experts_bxTxK, weights_bxTxK, num_experts, capacity)
    return _slots_local(x_bxTxD, dispatch, combine, w_gate, w_up, w_down, ep=ep, dtype=dtype), kept


def _slots_local(x_bxTxD, dispatch_bxTxExC, combine_bxTxExC, w_gate, w_up, w_down, *, ep, dtype):
    b = x_bxTxD.shape[0]
    xe_bxExCxD = gather_slots(dispatch_bxTxExC, x_bxTxD, dtype)
    _, E, C, D = xe_bxExCxD.shape
    xe = _all_to_all(xe_bxExCxD.reshape(b, ep, E // ep, C, D), 1, 0)     # [ep b, 1, E / ep, C, D]
    ye = expert_ffn_slots(xe.reshape(ep * b, E // ep, C, D), w_gate, w_up, w_down, dtype)
    ye_bxExCxD = _all_to_all(ye.reshape(ep * b, 1, E // ep, C, D), 0, 1).reshape(b, E, C, D)
    return jnp.einsum("btec,becd->btd", combine_bxTxExC, ye_bxExCxD)


def capacity(x_BxTxD, experts_BxTxK, weights_BxTxK, w_gate, w_up, w_down, *, capacity: int, dtype):
    """Expert-parallel `layers.moe.capacity.capacity`: (float32 [B, T, D], kept mask [B, T, K])."""
    num_experts = w_gate.shape[0]
    ep, token_axes = _layout(num_experts, x_BxTxD.shape[0], "batch rows")
    rows, weights = P(token_axes, None, None), P(AXIS, None, None)
    local = functools.partial(_capacity_local, ep=ep, num_experts=num_experts, capacity=capacity, dtype=dtype)
    return jax.shard_map(local, in_specs=(rows, rows, rows, weights, weights, weights), out_specs=(rows, rows),
                         check_vma=False)(x_BxTxD, experts_BxTxK, weights_BxTxK, w_gate, w_up, w_down)


def slots_ffn(x_BxTxD, dispatch_BxTxExC, combine_BxTxExC, w_gate, w_up, w_down, *, dtype):
    """Expert-parallel `layers.moe.capacity.slots_ffn`: float32 [B, T, D]."""
    num_experts = w_gate.shape[0]
    ep, token_axes = _layout(num_experts, x_BxTxD.shape[0], "batch rows")
    rows, slots, weights = P(token_axes, None, None), P(token_axes, None, None, None), P(AXIS, None, None)
    local = functools.partial(_slots_local, ep=ep, dtype=dtype)
    return jax.shard_map(local, in_specs=(rows, slots, slots, weights, weights, weights), out_specs=rows,
                         check_vma=False)(x_BxTxD, dispatch_BxTxExC, combine_BxTxExC, w_gate, w_up, w_down)
