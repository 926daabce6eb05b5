"""Grouped matmul for CPU (and any backend): batched matmuls over padded groups, with a loop over
row tiles for skewed loads. Never G times the dense product, which is what `jax.lax.ragged_dot`
lowers to on CPU.

Capacity path (near-balanced loads): the rows of group g are gathered into block g of
`x [G, C, K]` (C >= max(group_sizes), padding rows zero), one batched einsum
`y [G, C, N] = x @ rhs` with float32 accumulation, and the rows gathered back. rhs is used as is
(no weight copies). C is compiled for M / G x {1, 9/8, 5/4, 3/2} (rounded up to 8, kept while
G C <= 2 M); `lax.switch` runs the smallest C that holds the largest group, so exactly balanced
groups do M rows of work and a router's near-balanced load 1/8 to 1/4 more.

Tile path (anything else): megablox's schedule on the original row order. Row tiles
[i tm, (i + 1) tm) are visited once per group they hold (at most ceil(M / tm) + G - 1 visits; a
`fori_loop` over the visits actually needed), each visit a [tm, K] x [K, N] matmul with its
group's weight whose rows of that group are stored. Work is at most M + G tm rows; no weight is
copied, so the compiled program stays small in memory. (On a 2-core CPU a matmul inside a loop
runs ~1.5-2x slower per FLOP than one big matmul, hence the capacity path first. Batched tiles
with a copy of the weight per tile were tried as the fallback: the copies, up to (M / tm + G) K N,
grew the temporary buffer of the whole program, which glibc maps afresh on every call above
32 MB, and the page faults slowed the balanced path by ~50% even when the fallback did not run.)

Tile rule: tm = M / G rounded down to a power of two, in [8, 256], and at most M: large enough
for an efficient matmul per visit, small enough that the partial tiles (up to G - 1 extra
visits) stay a fraction of the work, and small inputs get small tiles.

Gradients (custom_vjp, same switch): dlhs is the same product with rhs transposed; drhs the
per-block (per-visit) product x^T dy, accumulated per group. The backward is not G-fold either.
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


class Plan(NamedTuple):
    """Static choices for one (M, G): capacities of the batched path, row tile of the loop path."""
    capacities: tuple[int, ...]
    tile: int


def tile_rows(M: int, G: int) -> int:
    """The row tile of the loop path: M / G rounded down to a power of two, in [8, 256], <= M."""
    per_group = max(1, M // G)
    return int(min(M, 256, max(8, 1 << (per_group.bit_length() - 1))))


def plan(M: int, G: int) -> Plan:
    capacities = sorted({min(M, -(-math.ceil(M * f / G) // 8) * 8) for f in (1, 1.125, 1.25, 1.5)})
    return Plan(tuple(c for c in capacities if G * c <= 2 * M), tile_rows(M, G))


def _capacity_layout(group_sizes, M: int, C: int):
    """(source row of each slot [G C] (M: padding), slot of each row [M] (G C: after the last group))."""
    G = group_sizes.shape[0]
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    slot_group, offset = jnp.arange(G * C) // C, jnp.arange(G * C) % C
    source = jnp.where(offset < group_sizes[slot_group], starts[slot_group] + offset, M)
    row = jnp.arange(M)
    row_group = jnp.minimum(jnp.searchsorted(ends, row, side="right", method="compare_all"), G - 1)
    slot_of_row = jnp.where(row < ends[-1], row_group * C + row - starts[row_group], G * C)
    return source, slot_of_row


def _gather(x, index):
    return jnp.take(x, index, axis=0, mode="fill", fill_value=0)


def _capacity_forward(C, lhs, rhs, group_sizes, *, out_dtype):
    source, slot_of_row = _capacity_layout(group_sizes, lhs.shape[0], C)
    x_GxCxK = _gather(lhs, source).reshape(rhs.shape[0], C, -1)
    y_GxCxN = jnp.einsum("gck,gkn->gcn", x_GxCxK, rhs, preferred_element_type=jnp.float32)
    return _gather(y_GxCxN.reshape(-1, rhs.shape[2]), slot_of_row).astype(out_dtype)


def _capacity_backward(C, lhs, rhs, group_sizes, dout):
    G = rhs.shape[0]
    source, slot_of_row = _capacity_layout(group_sizes, lhs.shape[0], C)
    x_GxCxK = _gather(lhs, source).reshape(G, C, -1)
    dy_GxCxN = _gather(dout, source).reshape(G, C, -1)
    dx_GxCxK = jnp.einsum("gcn,gkn->gck", dy_GxCxN, rhs, preferred_element_type=jnp.float32)
    dw_GxKxN = jnp.einsum("gck,gcn->gkn", x_GxCxK, dy_GxCxN, preferred_element_type=jnp.float32)
    return _gather(dx_GxCxK.reshape(G * C, -1), slot_of_row).astype(lhs.dtype), dw_GxKxN.astype(rhs.dtype)


def _visits(group_sizes, M: int, tm: int):
    """Visit v works on group[v] in row tile tile[v]; `count` visits are needed (static bound
    ceil(M / tm) + G - 1). Group by group, tiles in order, as in megablox."""
    G = group_sizes.shape[0]
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    first_tile = starts // tm
    tiles = jnp.where(group_sizes > 0, (ends - 1) // tm - first_tile + 1, 0)
    tiles_end = jnp.cumsum(tiles)
    visit = jnp.arange(-(-M // tm) + G - 1)
    group = jnp.minimum(jnp.searchsorted(tiles_end, visit, side="right", method="compare_all"), G - 1)
    tile = first_tile[group] + visit - (tiles_end[group] - tiles[group])
    return group, tile, tiles_end[-1], starts, ends


def _visit_rows(v, visits, M: int, tm: int):
    """(first row of the [tm] window of visit v, mask of its rows that the visit owns)."""
    group, tile, _, starts, ends = visits
    g = group[v]
    start = jnp.minimum(tile[v] * tm, M - tm)   # the last tile may be partial: shift the window back
    row = start + jnp.arange(tm)
    return g, start, (row >= jnp.maximum(tile[v] * tm, starts[g])) & (row < ends[g])


def _tile_product(lhs, rhs, group_sizes, tm, out_dtype, *, transpose_rhs=False):
    """out[rows of g] = lhs[rows of g] @ rhs[g] (or rhs[g]^T), rows after the last group 0."""
    M = lhs.shape[0]
    visits = _visits(group_sizes, M, tm)
    contract = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))

    def visit(v, out):
        g, start, owned = _visit_rows(v, visits, M, tm)
        y = lax.dot_general(lax.dynamic_slice_in_dim(lhs, start, tm), rhs[g], contract,
                            preferred_element_type=jnp.float32).astype(out_dtype)
        kept = jnp.where(owned[:, None], y, lax.dynamic_slice_in_dim(out, start, tm))
        return lax.dynamic_update_slice_in_dim(out, kept, start, 0)

    N = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    return lax.fori_loop(0, visits[2], visit, jnp.zeros((M, N), out_dtype))


def _tile_weight_grad(lhs, dout, group_sizes, G, tm):
    """drhs[g] = lhs[rows of g]^T dout[rows of g], float32 [G, K, N]."""
    M = lhs.shape[0]
    visits = _visits(group_sizes, M, tm)

    def visit(v, dw):
        g, start, owned = _visit_rows(v, visits, M, tm)
        dy = jnp.where(owned[:, None], lax.dynamic_slice_in_dim(dout, start, tm), 0)
        dw_KxN = lax.dot_general(lax.dynamic_slice_in_dim(lhs, start, tm), dy, (((0,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)
        return dw.at[g].add(dw_KxN)

    return lax.fori_loop(0, visits[2], visit, jnp.zeros((G, lhs.shape[1], dout.shape[1]), jnp.float32))


def _tile_forward(lhs, rhs, group_sizes, *, tm, out_dtype):
    return _tile_product(lhs, rhs, group_sizes, tm, out_dtype)


def _tile_backward(lhs, rhs, group_sizes, dout, *, tm):
    dlhs = _tile_product(dout, rhs, group_sizes, tm, lhs.dtype, transpose_rhs=True)
    return dlhs, _tile_weight_grad(lhs, dout, group_sizes, rhs.shape[0], tm).astype(rhs.dtype)


def _choose(group_sizes, capacities):
    """Index of the smallest capacity holding the largest group; len(capacities): the tile path."""
    return jnp.sum(jnp.max(group_sizes) > jnp.asarray(capacities, jnp.int32)) if capacities else 0


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _grouped(lhs, rhs, group_sizes, plan, out_dtype):
    branches = [functools.partial(_capacity_forward, C, out_dtype=out_dtype) for C in plan.capacities]
    branches.append(functools.partial(_tile_forward, tm=plan.tile, out_dtype=out_dtype))
    return lax.switch(_choose(group_sizes, plan.capacities), branches, lhs, rhs, group_sizes)


def _grouped_fwd(lhs, rhs, group_sizes, plan, out_dtype):
    return _grouped(lhs, rhs, group_sizes, plan, out_dtype), (lhs, rhs, group_sizes)


def _grouped_bwd(plan, out_dtype, residuals, dout):
    lhs, rhs, group_sizes = residuals
    branches = [functools.partial(_capacity_backward, C) for C in plan.capacities]
    branches.append(functools.partial(_tile_backward, tm=plan.tile))
    dlhs, drhs = lax.switch(_choose(group_sizes, plan.capacities), branches, lhs, rhs, group_sizes, dout)
    return dlhs, drhs, None


_grouped.defvjp(_grouped_fwd, _grouped_bwd)


def grouped_matmul(lhs, rhs, group_sizes, *, preferred_element_type):
    M, G = lhs.shape[0], rhs.shape[0]
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    if M == 0:
        return jnp.zeros((0, rhs.shape[2]), out_dtype)
    return _grouped(lhs, rhs, group_sizes, plan(M, G), out_dtype)
