"""Kernel calls partitioned over the mesh: every op call site in `layers` goes through here.

A `pallas_call` has no SPMD partitioning rule: inside `jit` on sharded arrays XLA cannot split it
(Mosaic refuses at lowering: "Mosaic kernels cannot be automatically partitioned. Please wrap the
call in a shard_map"), and a GPU kernel would be gathered onto every device. So each op runs under
`jax.shard_map` over the mesh axes that do not split its reduction:

    rows    (logical "batch")            over data, fsdp, expert
    heads   ("heads", "kv_heads")        over tensor, the two split alike (grouped queries stay whole)
    hidden  ("mlp", for grouped matmul)  over tensor, the partial products summed (psum) afterwards
    time    ("length")                   never here: the sequence-parallel paths (LASP-2, ring
                                         attention, gathered keys) own the seq axis and call the
                                         ops inside their own shard_map

A dimension that its axes do not divide (3 heads over tensor=2, a batch of 1 while decoding)
stays whole on those axes, and the call is repeated there, as `layers.sharding` does for
parameters. Axes that are already manual (inside another `shard_map`) are left alone; without a
mesh, or with nothing to split, the op is called directly. The wrappers below keep each op's
signature (`pallas_kernels`), so a call site only changes its import; the MoE layer wraps its
whole dropless dispatch (sort, grouped matmuls, combine) with `partitioned` itself, since the sort
must stay within a device's rows.
"""

import math
from collections.abc import Callable, Sequence

import jax
from jax.sharding import AxisType, PartitionSpec as P

from hybrax.layers.sharding import current_mesh
from hybrax.pallas_kernels import block_sparse_attention as _block_sparse_attention
from hybrax.pallas_kernels import delta_rule as _delta_rule
from hybrax.pallas_kernels import dot_product_attention as _dot_product_attention
from hybrax.pallas_kernels import linear_attention as _linear_attention
from hybrax.pallas_kernels import mlstm as _mlstm
from hybrax.pallas_kernels import slstm as _slstm

Names = tuple[str | None, ...] | None   # one logical name per dimension; None: a replicated argument

SPLIT: dict[str, tuple[str, ...]] = {"batch": ("data", "fsdp", "expert"), "heads": ("tensor",),
                                     "kv_heads": ("tensor",), "mlp": ("tensor",)}
TIED = {"kv_heads": "heads"}   # split alike: query head h reads key/value head h // (H / Hkv) locally


def free_axes(mesh) -> tuple[str, ...]:
    """Mesh axes of size > 1 not already manual (outside any enclosing shard_map)."""
    if mesh is None:
        return ()
    return tuple(a for a, kind in zip(mesh.axis_names, mesh.axis_types)
                 if kind != AxisType.Manual and mesh.shape[a] > 1)


def split_axes(mesh, free: Sequence[str], arrays: Sequence, names: Sequence[Names]) -> dict[str, tuple[str, ...]]:
    """Logical name -> the mesh axes that split it: its axes in SPLIT, trailing ones dropped until
    they divide every dimension of that name (and of the names tied to it)."""
    sizes: dict[str, list[int]] = {}
    for x, dims in zip(arrays, names):
        for size, name in zip(x.shape, dims or ()):
            if name in SPLIT:
                sizes.setdefault(TIED.get(name, name), []).append(size)
    axes_of = {}
    for name, group_sizes in sizes.items():
        axes = [a for a in SPLIT[name] if a in free]
        while axes and any(s % math.prod(mesh.shape[a] for a in axes) for s in group_sizes):
            axes.pop()
        axes_of[name] = tuple(axes)
    for tied, name in TIED.items():
        if name in axes_of:
            axes_of.setdefault(tied, axes_of[name])
    return axes_of


def _spec(dims: Names, axes_of: dict[str, tuple[str, ...]]) -> P:
    entries = []
    for name in dims or ():
        axes = axes_of.get(TIED.get(name, name), ()) if name else ()
        entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*entries)


def partitioned(fn: Callable, in_names: Sequence[Names], out_names, *, summed: Sequence[str] = ()) -> Callable:
    """`fn(*arrays)` under `shard_map` over the free mesh axes.

    in_names: the logical names of each argument's dimensions (None for an argument passed whole;
    a None argument stays None). out_names: the same for the output, a tuple of names or a tuple of
    them (for several outputs). summed: logical names whose split leaves the outputs as partial
    sums (a contraction over a split "mlp" dimension), reduced with psum over their axes."""
    def call(*arrays):
        mesh = current_mesh()
        free = free_axes(mesh)
        if not free:
            return fn(*arrays)
        present = [i for i, x in enumerate(arrays) if x is not None]
        given = [arrays[i] for i in present]
        axes_of = split_axes(mesh, free, given, [in_names[i] for i in present])
        reduce_over = tuple(a for name in summed for a in axes_of.get(name, ()))

        def local(*local_arrays):
            full = list(arrays)
            for i, x in zip(present, local_arrays):
                full[i] = x
            out = fn(*full)
            return jax.tree.map(lambda y: jax.lax.psum(y, reduce_over), out) if reduce_over else out

        several = bool(out_names) and isinstance(out_names[0], tuple)
        out_specs = tuple(_spec(n, axes_of) for n in out_names) if several else _spec(out_names, axes_of)
        in_specs = tuple(_spec(in_names[i], axes_of) for i in present)
        # manual over every axis not manual yet, size 1 too: Mosaic refuses any axis left to the partitioner
        manual = {a for a, kind in zip(mesh.axis_names, mesh.axis_types) if kind != AxisType.Manual}
        return jax.shard_map(local, in_specs=in_specs, out_specs=out_specs, axis_names=manual,
                             check_vma=False)(*given)
    return call


ROWS_HEADS = ("batch", None, "heads", None)        # [B, T, H, D]
ROWS_KV_HEADS = ("batch", None, "kv_heads", None)  # [B, S, Hkv, D]
ROWS = ("batch", None)                             # [B, T]
STATE = ("batch", "heads", None, None)             # [B, H, K, V]
ROWS_TIME_HEADS = ("batch", None, "heads")         # [B, T, H]: per-head gates
HEAD_VECTORS = ("batch", "heads", None)            # [B, H, D]: normalisers, sLSTM cells
PER_HEAD = ("batch", "heads")                      # [B, H]: stabilisers


def linear_attention(q, k, v, log_decay=None, *, initial_state=None, segment_ids=None, return_final_state=False,
                     **options):
    """`pallas_kernels.linear_attention`, partitioned over rows and heads (no state crosses either)."""
    decay_names = None if log_decay is None else ("batch", None, "heads", None)[:log_decay.ndim]

    def run(q, k, v, log_decay, initial_state, segment_ids):
        o, final = _linear_attention(q, k, v, log_decay, initial_state=initial_state, segment_ids=segment_ids,
                                     return_final_state=return_final_state, **options)
        return (o, final) if return_final_state else o

    out_names = (ROWS_HEADS, STATE) if return_final_state else ROWS_HEADS
    out = partitioned(run, (ROWS_HEADS, ROWS_HEADS, ROWS_HEADS, decay_names, STATE, ROWS), out_names)(
        q, k, v, log_decay, initial_state, segment_ids)
    return out if return_final_state else (out, None)


def block_sparse_attention(q, k, v, block_indices, *, segment_ids=None, query_blocks=None, kv_segment_ids=None,
                           **options):
    """`pallas_kernels.block_sparse_attention`, partitioned over rows and heads; block_indices
    [B, H, nq, n_sel] split like q's heads, query_blocks [nq] passed whole."""
    def run(q, k, v, block_indices, segment_ids, query_blocks, kv_segment_ids):
        return _block_sparse_attention(q, k, v, block_indices, segment_ids=segment_ids, query_blocks=query_blocks,
                                       kv_segment_ids=kv_segment_ids, **options)

    names = (ROWS_HEADS, ROWS_KV_HEADS, ROWS_KV_HEADS, ("batch", "heads", None, None), ROWS, (None,), ROWS)
    return partitioned(run, names, ROWS_HEADS)(q, k, v, block_indices, segment_ids, query_blocks, kv_segment_ids)


def dot_product_attention(q, k, v, *, segment_ids=None, mask=None, **options):
    """`pallas_kernels.dot_product_attention`, partitioned over rows and heads; a mask [Tq, Tk] or
    [B, Tq, Tk] is split over rows only."""
    mask_names = None if mask is None else (("batch", None, None) if mask.ndim == 3 else (None, None))
    run = lambda q, k, v, segment_ids, mask: _dot_product_attention(  # noqa: E731
        q, k, v, segment_ids=segment_ids, mask=mask, **options)
    return partitioned(run, (ROWS_HEADS, ROWS_KV_HEADS, ROWS_KV_HEADS, ROWS, mask_names), ROWS_HEADS)(
        q, k, v, segment_ids, mask)


def delta_rule(q, k, v, beta, log_decay=None, *, initial_state=None, segment_ids=None, return_final_state=False,
               **options):
    """`pallas_kernels.delta_rule`, partitioned over rows and heads (no state crosses either)."""
    def run(q, k, v, beta, log_decay, initial_state, segment_ids):
        o, final = _delta_rule(q, k, v, beta, log_decay, initial_state=initial_state, segment_ids=segment_ids,
                               return_final_state=return_final_state, **options)
        return (o, final) if return_final_state else o

    names = (ROWS_HEADS, ROWS_HEADS, ROWS_HEADS, ROWS_TIME_HEADS, ROWS_TIME_HEADS, STATE, ROWS)
    out = partitioned(run, names, (ROWS_HEADS, STATE) if return_final_state else ROWS_HEADS)(
        q, k, v, beta, log_decay, initial_state, segment_ids)
    return out if return_final_state else (out, None)


def mlstm(q, k, v, log_input_gate, log_forget_gate, *, initial_state=None, segment_ids=None,
          return_final_state=False, **options):
    """`pallas_kernels.mlstm`, partitioned over rows and heads; the state is (C, n, m)."""
    def run(q, k, v, log_input_gate, log_forget_gate, c, n, m, segment_ids):
        state = None if c is None else (c, n, m)
        h, final = _mlstm(q, k, v, log_input_gate, log_forget_gate, initial_state=state, segment_ids=segment_ids,
                          return_final_state=return_final_state, **options)
        return (h, *final) if return_final_state else h

    state = (None, None, None) if initial_state is None else tuple(initial_state)
    names = (ROWS_HEADS, ROWS_HEADS, ROWS_HEADS, ROWS_TIME_HEADS, ROWS_TIME_HEADS, STATE, HEAD_VECTORS, PER_HEAD,
             ROWS)
    out_names = (ROWS_HEADS, STATE, HEAD_VECTORS, PER_HEAD) if return_final_state else ROWS_HEADS
    out = partitioned(run, names, out_names)(q, k, v, log_input_gate, log_forget_gate, *state, segment_ids)
    return (out[0], tuple(out[1:])) if return_final_state else (out, None)


def slstm(gate_inputs, recurrent_weights, *, initial_state=None, segment_ids=None, return_final_state=False,
          **options):
    """`pallas_kernels.slstm`, partitioned over rows and heads (heads are independent: the
    recurrent weights are block-diagonal); the state is (c, n, m, h)."""
    def run(gate_inputs, recurrent_weights, c, n, m, h, segment_ids):
        state = None if c is None else (c, n, m, h)
        out, final = _slstm(gate_inputs, recurrent_weights, initial_state=state, segment_ids=segment_ids,
                            return_final_state=return_final_state, **options)
        return (out, *final) if return_final_state else out

    state = (None,) * 4 if initial_state is None else tuple(initial_state)
    names = (("batch", None, "heads", None, None), ("heads", None, None, None), *(HEAD_VECTORS,) * 4, ROWS)
    out_names = (ROWS_HEADS, *(HEAD_VECTORS,) * 4) if return_final_state else ROWS_HEADS
    out = partitioned(run, names, out_names)(gate_inputs, recurrent_weights, *state, segment_ids)
    return (out[0], tuple(out[1:])) if return_final_state else (out, None)
