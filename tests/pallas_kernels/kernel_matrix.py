"""How the slow kernel matrix is shared between the two Pallas kernels on a CPU.

On a CPU both kernels of an op (pallas_tpu, pallas_gpu) run in Pallas interpret mode, seconds to
tens of seconds per case, and for the newer ops they share their per-chunk math (`chunk_math.py`,
`kernel_cell.py`). So on a CPU each case of the slow matrix runs on one of the two, alternately;
every case still runs on some kernel, each kernel keeps its fast cases and its own tests
(test_<op>_pallas.py: TPU-semantics interpreter, unaligned shapes, compilation). On an accelerator
the other accelerator's kernel refuses every case anyway, so there (the device check) the kernel
of that accelerator runs the whole matrix.
"""

import jax


def runs_case(implementation: str, index: int, kernels) -> bool:
    """Whether `implementation` runs case number `index` of the slow matrix here."""
    kernels = list(kernels)
    if jax.default_backend() != "cpu" or implementation not in kernels:
        return True
    return index % len(kernels) == kernels.index(implementation)
