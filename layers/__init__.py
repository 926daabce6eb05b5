"""Flax NNX layers, one file per family."""
