"""Sequence parallelism over the mesh axis `seq`, inside the mixers (`jax.shard_map`).

Every mixer takes this path when the current mesh (`jax.set_mesh`) has seq > 1 and it is not
decoding from a cache; otherwise nothing here runs.

    layout          the zigzag token order every seq-sharded array is stored in (applied once, at
                    the data input), and each device's natural positions
    lasp2           LASP-2 for the linear family (linear_attention, gla, mamba2): one all-gather
                    of per-chunk states per layer and direction, independent of T
    halo            Mamba-2's short convolutions across chunk seams (collective-permutes)
    ring_attention  causal softmax attention: K/V blocks around the ring with ppermute, online
                    softmax, a ring backward; each step's block behind the switch (jnp, or
                    ring_block_splash: jax's fused splash kernels on a TPU)
    gathered_keys   the block-sparse mixers (moba, nsa, bilevel routing, routing attention, sparse
                    prefill): local queries against keys and values all-gathered over seq
    local_chunks    a device's two zigzag chunks stacked on the batch dim
    packing         segment ids carried exactly inside float32 exchange buffers

MoE's expert parallelism over the `expert` axis lives with the MoE layer (layers/moe/expert_parallel).
Off the seq path, kernel calls are partitioned over rows and heads by layers/partitioned.py.
"""
