"""Sequence parallelism over the mesh axis `seq`, inside the mixers (`jax.shard_map`).

Every mixer takes this path when the current mesh (`jax.set_mesh`) has seq > 1 and it is not
decoding from a cache; otherwise nothing here runs. Each family's own algorithm sits beside it:
layers/softmax/ring_attention.py (and ring_block_splash.py), layers/linear/lasp2.py,
layers/sparse/gathered_keys.py. The shared pieces are here:

    layout          the zigzag token order every seq-sharded array is stored in (applied once, at
                    the data input), and each device's natural positions
    halo            short causal convolutions across chunk seams (collective-permutes): Mamba-2's
    local_chunks    a device's two zigzag chunks stacked on the batch dim
    packing         segment ids carried exactly inside float32 exchange buffers

MoE's expert parallelism over the `expert` axis lives with the MoE layer (layers/moe/expert_parallel).
Off the seq path, kernel calls are partitioned over rows and heads by layers/partitioned.py.
"""
