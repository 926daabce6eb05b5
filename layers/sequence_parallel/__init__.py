"""Sequence parallelism over the mesh axis `seq`, inside the mixers (`jax.shard_map`).

layout: the causal load-balanced (zigzag) token order every seq-sharded array is stored in.
"""
