"""Short causal convolutions over the mesh axis `seq`: each local chunk fetches the W - 1 tokens that
precede it in natural order (its halo) from the device holding the preceding chunk.

In the zigzag layout (layout.py) device d holds natural chunks d (slot 0) and 2P - 1 - d (slot 1).
The chunk before slot 0 is chunk d - 1, slot 0 of device d - 1 (none for d = 0: zeros); the chunk
before slot 1 is chunk 2P - 2 - d, slot 1 of device d + 1, except on device P - 1, where it is its
own slot 0. So two `ppermute`s (collective-permutes) move the last W - 1 tokens of every slot-0
chunk one device up and of every slot-1 chunk one device down; the tails of all convolutions and
their segment ids (packing.py) travel packed in one buffer [b, W - 1, n]. The halo is the
convolution's carried state, its ids the state's segment ids (`short_causal_conv`), so a document
that starts on a chunk seam sees zeros before it, as on one device. The backward of a ppermute is
the reverse ppermute; autodiff provides it.
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from hybrax.layers.sequence_parallel import local_chunks
from hybrax.layers.sequence_parallel.layout import SEQ_AXIS, check_length, seq_size
from hybrax.layers.sequence_parallel.packing import float32_to_ids, ids_to_float32
from hybrax.layers.sharding import spec
from hybrax.layers.short_conv import short_causal_conv


def short_causal_convs_sequence_parallel(convs: Sequence[tuple], *, segment_ids=None) -> list[jax.Array]:
    """`short_causal_conv` (zero initial state) of several inputs over the mesh axis `seq`.

    convs: (x `[B, T, *C]`, weight `[W, *C]`, bias `[*C]`, channel_names) per convolution, with
    channel_names the logical names of the channel dims `*C` (for the shard_map specs) and one
    width W for all; x and segment_ids `[B, T]` in stored (zigzag) order, sharded over `seq` on T.
    Returns the outputs y `[B, T, *C]`, same order and sharding. Needs T / (2 seq) >= W - 1.
    """
    num_devices = seq_size()
    T, width = convs[0][0].shape[1], convs[0][1].shape[0]
    check_length(T, num_devices)
    if T // (2 * num_devices) < width - 1:
        raise ValueError(f"chunk length T / (2 * seq) = {T // (2 * num_devices)} must be >= conv_width - 1 = "
                         f"{width - 1} for the convolution halo (T={T}, seq={num_devices})")
    arrays = {"convs": [(x, weight, bias) for x, weight, bias, _ in convs]}
    specs = {"convs": [(spec(("batch", "length", *names), x.shape), spec((None, *names), weight.shape),
                        spec(names, bias.shape)) for x, weight, bias, names in convs]}
    if segment_ids is not None:
        arrays["segment_ids"], specs["segment_ids"] = segment_ids, spec(("batch", "length"), segment_ids.shape)
    out_specs = [x_spec for x_spec, _, _ in specs["convs"]]
    local = functools.partial(_local, num_devices=num_devices)
    return jax.shard_map(local, in_specs=(specs,), out_specs=out_specs, check_vma=False)(arrays)


def _halo(tails_2xbxWxn, num_devices):
    """The packed tails of this device's (slot 0, slot 1) chunks -> the halos of the same slots."""
    up = [(d, d + 1) for d in range(num_devices - 1)]
    from_below = jax.lax.ppermute(tails_2xbxWxn[0], SEQ_AXIS, perm=up)  # zeros on device 0
    from_above = jax.lax.ppermute(tails_2xbxWxn[1], SEQ_AXIS, perm=[(b, a) for a, b in up])
    last = jax.lax.axis_index(SEQ_AXIS) == num_devices - 1
    return jnp.stack([from_below, jnp.where(last, tails_2xbxWxn[0], from_above)])


def _local(arrays, *, num_devices):
    convs, segment_ids = arrays["convs"], arrays.get("segment_ids")
    width = convs[0][1].shape[0]
    xs = [local_chunks.stack(x) for x, _, _ in convs]  # [2b, c, *C]
    two_b = xs[0].shape[0]
    tails = [x[:, -(width - 1):].reshape(two_b, width - 1, -1).astype(jnp.float32) for x in xs]
    seg = None if segment_ids is None else local_chunks.stack(segment_ids.astype(jnp.int32))
    if seg is not None:
        tails.append(ids_to_float32(seg[:, -(width - 1):]))
    packed = jnp.concatenate(tails, axis=-1)
    halo = _halo(packed.reshape(2, two_b // 2, *packed.shape[1:]), num_devices).reshape(packed.shape)
    halo_seg = None if seg is None else float32_to_ids(halo[..., -2:])
    outputs, start = [], 0
    for x, (_, weight, bias) in zip(xs, convs):
        size = x[0, 0].size
        state = halo[..., start:start + size].reshape(two_b, width - 1, *x.shape[2:]).astype(x.dtype)
        start += size
        y, _ = short_causal_conv(x, weight, bias, segment_ids=seg, state=state, state_segment_ids=halo_seg)
        outputs.append(local_chunks.unstack(y))
    return outputs
