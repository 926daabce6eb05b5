"""A TPU device to AOT-compile for on a machine without one: the kernels' lowering check.

`jax.jit(f).trace(...).lower(lowering_platforms=("tpu",))` does not check Mosaic's lowering rules;
compiling for a device of a TPU topology does (libtpu compiles on the CPU). The test is skipped
where libtpu is not installed (`pip install -e '.[test]'` installs it).
"""

import os

import pytest


def v5e_device():
    """One device of a v5e 2x2 topology."""
    pytest.importorskip("libtpu", reason="libtpu not installed (pip install -e '.[test]')")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other jax processes may hold the lock
    from jax.experimental import topologies
    return topologies.get_topology_desc("v5e:2x2", "tpu").devices[0]
