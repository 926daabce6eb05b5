"""sLSTM over the mesh axis `seq`, head-parallel (DeepSpeed-Ulysses' re-sharding, Jacobs et al.
2023): the sLSTM state is not a linear function of the state before it (the recurrent weights act
through tanh and the gates on h_{t-1}), so no chunk can be summarised by a map of its incoming
state and LASP-style passing is impossible; the recurrence is strictly sequential in time. Its
heads, though, are independent (the recurrent weights are block-diagonal per head), so

    gate inputs [b, T/P, H, 4, D] (time split over seq, zigzag order)
      -> all_to_all over seq: [b, T, H/P, 4, D] (the whole sequence, a P-th of the heads)
      -> zigzag -> natural order, the recurrence over all T for this device's heads
      -> natural -> zigzag, all_to_all back: h [b, T/P, H, D]

What travels per layer and device: (P - 1) / P of its gate inputs and of its outputs (5 H D
numbers per local token) each way, and the segment ids gathered (T per row); it grows with T, as
any exchange for a non-linear recurrence must. The work is not duplicated: each device runs T
steps for H/P heads. It needs the heads on a device (after any tensor split) divisible by `seq`.
"""

import functools

import jax

from hybrax.layers.sequence_parallel.layout import SEQ_AXIS, check_length, from_zigzag, seq_size, to_zigzag
from hybrax.layers.sharding import spec
from hybrax.pallas_kernels.slstm import slstm


def slstm_sequence_parallel(gate_inputs_BxTxHx4xD, recurrent_weights_HxDx4xD, *, segment_ids=None,
                            implementation=None) -> jax.Array:
    """`slstm` over the mesh axis `seq` (from `jax.set_mesh`), zero initial state.

    gate_inputs `[B, T, H, 4, D]` and segment_ids `[B, T]` in stored (zigzag) order, sharded over
    `seq` on T (layout.py); recurrent_weights `[H, D, 4, D]`. Returns h `[B, T, H, D]`, same order
    and sharding. T must be a multiple of 2 * seq.
    """
    num_devices = seq_size()
    check_length(gate_inputs_BxTxHx4xD.shape[1], num_devices)
    arrays = {"gates": gate_inputs_BxTxHx4xD, "weights": recurrent_weights_HxDx4xD}
    specs = {"gates": spec(("batch", "length", "heads", None, None), gate_inputs_BxTxHx4xD.shape),
             "weights": spec(("heads", None, None, None), recurrent_weights_HxDx4xD.shape)}
    if segment_ids is not None:
        arrays["segment_ids"], specs["segment_ids"] = segment_ids, spec(("batch", "length"), segment_ids.shape)
    out_spec = spec(("batch", "length", "heads", None), gate_inputs_BxTxHx4xD.shape[:3] + (1,))
    local = functools.partial(_local, num_devices=num_devices, implementation=implementation)
    return jax.shard_map(local, in_specs=(specs,), out_specs=out_spec, check_vma=False)(arrays)


def _local(arrays, *, num_devices, implementation):
    gates, weights = arrays["gates"], arrays["weights"]
    heads = gates.shape[2]
    if heads % num_devices:
        raise ValueError(f"slstm under seq={num_devices} runs heads in parallel: the {heads} heads on each device "
                         f"must be divisible by seq={num_devices} (set model.slstm.num_heads)")
    share = heads // num_devices
    whole = jax.lax.all_to_all(gates, SEQ_AXIS, split_axis=2, concat_axis=1, tiled=True)  # [b, T, H/P, 4, D]
    whole = from_zigzag(whole, num_devices, axis=1)
    mine = jax.lax.dynamic_slice_in_dim(weights, jax.lax.axis_index(SEQ_AXIS) * share, share, axis=0)
    segment_ids = arrays.get("segment_ids")
    if segment_ids is not None:
        segment_ids = from_zigzag(jax.lax.all_gather(segment_ids, SEQ_AXIS, axis=1, tiled=True), num_devices)
    h, _ = slstm(whole, mine, segment_ids=segment_ids, implementation=implementation)
    h = to_zigzag(h, num_devices, axis=1)
    return jax.lax.all_to_all(h, SEQ_AXIS, split_axis=1, concat_axis=2, tiled=True)  # [b, T/P, H, D]
