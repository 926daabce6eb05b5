"""hybrax: efficient sequence architectures in JAX.

    hybrax.arch            the model: config tree, layer registry, causal LM
    hybrax.layers          Flax NNX layers by family (softmax, sparse, linear, moe) and shared pieces
    hybrax.pallas_kernels  the ops: a plain reference, an XLA path and Pallas kernels for each
    hybrax.train           config, data, sharded train step and loop, checkpoints, sampling, AOT compile
    hybrax.experiments     sweeps, scaling-law fits, benchmarks
    hybrax.configs         the shipped presets (YAML)

In a checkout the subpackages are the repository's top-level folders (arch/, layers/, ...); the
package maps them under one name (pyproject.toml), so nothing but `hybrax` is installed. A checkout
also imports without installing (`PYTHONPATH=<checkout>`, as on a device machine): the repository
root is then searched for the subpackages.
"""

import pathlib

__version__ = "0.1.0"

_checkout = pathlib.Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "layers" / "__init__.py").is_file():
    __path__.append(str(_checkout))
