"""Every preset's train step, compiled for a v5e topology with the TPU kernels (Pallas linear and
block-sparse attention, splash, megablox), on data=4, fsdp=4, data=2 x tensor=2 and data=2 x seq=2
(experiments/bench/tpu_partitioning.py prints the same numbers as a table):

- it compiles: no kernel is left to XLA's partitioner (Mosaic refuses that at lowering);
- on data, fsdp and tensor meshes each kernel's operands are its device's shard (together <= 0.35 x
  one chip's at the same global batch: 1/4, plus per-row operands that tensor does not split), and no activation is all-gathered or sent all-to-all
  (fsdp gathers parameters only);
- data=4 needs <= 0.35 x one chip's temporaries at the same global batch;
- the eval step compiles on data=4 too.
Slow (about a minute per compile here): `make test-slow`.
"""

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from hybrax.experiments.bench.tpu_partitioning import MESHES, PRESETS, measure  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.tpu_compile]


@pytest.mark.parametrize("preset", PRESETS)
def test_kernels_run_on_device_shards(preset):
    pytest.importorskip("libtpu", reason="libtpu not installed (pip install -e '.[test]')")
    rows = {mesh: measure(preset, mesh) for mesh in ["data=1", *MESHES]}
    one = rows["data=1"]
    print({mesh: (p.temporaries, p.kernel_operands, p.collectives, p.kernels) for mesh, p in rows.items()})
    fell_back = [line for line in one.kernels if " xla (" in line and "refused" not in line]
    assert one.kernel_calls > 0 and fell_back == [], one.kernels   # xla only where a kernel said why not
    assert rows["data=4"].temporaries <= 0.35 * one.temporaries
    for mesh in ("data=4", "fsdp=4", "data=2,tensor=2"):
        p = rows[mesh]
        assert p.kernels == one.kernels, mesh
        assert p.activation_gathers == [] and "all-to-all" not in p.collectives, (mesh, p.activation_gathers)
        # 1/4 of every operand, but per-row ones (segment ids) split over data only: 0.32 at data=2 x tensor=2
        assert p.kernel_calls == one.kernel_calls and p.kernel_operands <= 0.35 * one.kernel_operands, mesh
    assert rows["data=2,seq=2"].temporaries > 0
    assert measure(preset, "data=4", step="eval").kernel_calls > 0
