"""hybrax: efficient sequence architectures in JAX.

    hybrax.arch            the model: config tree, layer registry, causal LM
    hybrax.layers          Flax NNX layers by family (softmax, sparse, linear, moe) and shared pieces
    hybrax.pallas_kernels  the ops: a plain reference, an XLA path and Pallas kernels for each
    hybrax.train           config, data, sharded train step and loop, checkpoints, sampling, AOT compile
    hybrax.experiments     sweeps, scaling-law fits, benchmarks
    hybrax.configs         the shipped presets (YAML)

In a checkout the subpackages are the repository's top-level folders (arch/, layers/, ...); the
package maps them under one name, so nothing but `hybrax` is installed.
"""

__version__ = "0.1.0"
