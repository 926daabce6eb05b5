"""Every preset's train step compiled for a v5e topology with the TPU kernels, on four meshes:
do the kernels run on per-device shards, and what travels?

    python experiments/bench/tpu_partitioning.py [--presets hybrid_gla moe] [--meshes data=4 fsdp=4]

For each preset (shrunk to 2 layers of d_model 128 so the compiles take seconds; the mixers keep
their kinds; 32 rows of 256 tokens, 128 for moe, where XLA's TPU scheduler keeps the small expert
buffers of 32 rows live long enough to hide the 1/4 split) and mesh it AOT-compiles the train step (train/compile.py) with the Pallas kernels
forced (`model.kernels.linear_attention=pallas`, `block_sparse_attention=pallas`,
`grouped_matmul=pallas_tpu`, attention `splash`, then xla where splash refuses: NSA's
compressed branch has an explicit mask) and reports, per device:

- temporaries, and their ratio to the same global batch on one chip (data=1);
- the bytes of every Mosaic kernel's operands, and their ratio to one chip: 1/4 when each kernel
  sees only its device's rows or heads;
- the collectives (count, bytes), and the all-gathers / all-to-alls that are not parameter
  all-gathers (a result with as many elements as a parameter or a routing state, as fsdp gathers
  its shards): on data, fsdp
  and tensor meshes there must be none, since nothing around a kernel needs a gathered activation.
  Under seq, the sequence-parallel paths gather by design (LASP-2 states, the sparse mixers' keys).
"""

import argparse
import dataclasses
import math
import os
import pathlib
import re
import sys

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")   # other jax processes may hold libtpu's lock

import jax  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))   # the checkout, when not installed

from hybrax.train.compile import array_bytes, compile_step, topology_devices  # noqa: E402
from hybrax.train.config import load_config  # noqa: E402
from hybrax.train.step import abstract_state  # noqa: E402
from hybrax.train.optim import make_optimizer  # noqa: E402

PRESETS = ("hybrid_gla", "mamba2", "moba", "nsa", "routing_attention", "bilevel_routing", "moe")
MESHES = {"data=4": {"data": 4}, "fsdp=4": {"fsdp": 4}, "data=2,tensor=2": {"data": 2, "tensor": 2},
          "data=2,seq=2": {"data": 2, "seq": 2}}
KERNELS = ["model.kernels.linear_attention=pallas", "model.kernels.block_sparse_attention=pallas",
           "model.kernels.grouped_matmul=pallas_tpu", "model.kernels.attention=[splash,xla]"]
SMALL = {"hybrid_gla": ["model.mixers=[gla,attention]"], "moe": ["train.grad_accum=2", "data.batch_size=128"]}
_GATHER = re.compile(r"^\s*(?:ROOT )?%?\S+ = (?P<shape>\S+) (?P<kind>all-gather|all-to-all)(?:-start)?\(")


@dataclasses.dataclass(frozen=True)
class Partitioning:
    preset: str
    mesh: str
    temporaries: int              # bytes per device
    kernel_operands: int          # bytes of all Mosaic kernel operands per device
    kernel_calls: int
    collectives: dict
    activation_gathers: list      # all-gather / all-to-all results that are not parameter shapes
    kernels: list                 # which implementation ran, per op


def overrides(preset: str, mesh: dict) -> list[str]:
    sizes = {"data": 1, "fsdp": 1, "tensor": 1, "seq": 1, "expert": 1, **mesh}
    return ["model.d_model=128", "model.num_layers=2", "data.batch_size=32", "data.seq_len=256",
            *SMALL.get(preset, []), *KERNELS, *(f"mesh.{axis}={n}" for axis, n in sizes.items())]


def kernel_operands(hlo: str) -> tuple[int, int]:
    """(calls, operand bytes) of the Mosaic custom calls in an optimised HLO module (their operand
    shapes are the `operand_layout_constraints`)."""
    calls = []
    for line in hlo.splitlines():
        if 'custom_call_target="tpu_custom_call"' not in line:
            continue
        start = line.index("operand_layout_constraints={") + len("operand_layout_constraints={")
        depth, end = 1, start
        while depth:   # balanced braces: each shape carries its own {layout}
            depth += {"{": 1, "}": -1}.get(line[end], 0)
            end += 1
        calls.append(re.sub(r"\{[^}]*\}", "", line[start:end - 1]))
    return len(calls), sum(array_bytes(operands) for operands in calls)


def parameter_sizes(config) -> set[int]:
    """Element counts of the parameters and the layers' non-gradient state (routing centroids): an
    fsdp all-gather may gather one transposed or reshaped, a centroid update shares its new rows."""
    _, state = abstract_state(config.model, make_optimizer(config.optim, config.train.steps))
    return {leaf.size for leaf in jax.tree.leaves((state.params, state.model_state))}


def activation_gathers(hlo: str, parameters: set[int]) -> list[str]:
    found = []
    for line in hlo.splitlines():
        match = _GATHER.match(line)
        if match is None:
            continue
        dims = re.findall(r"\[([0-9,]*)\]", match["shape"])
        sizes = [math.prod(int(d) for d in dim.split(",") if d) for dim in dims]
        if not all(size in parameters for size in sizes):
            found.append(f"{match['kind']} {match['shape']}")
    return found


def measure(preset: str, mesh_name: str, step: str = "train") -> Partitioning:
    mesh = MESHES.get(mesh_name, {"data": 1})
    devices = 1
    for n in mesh.values():
        devices *= n
    config = load_config(f"{preset}.yaml", overrides(preset, mesh))
    topology = topology_devices("v5e:1x1" if devices == 1 else "v5e:2x2")
    report = compile_step(config, topology, step=step)
    calls, operand_bytes = kernel_operands(report.hlo)
    return Partitioning(preset, mesh_name, report.memory.temporaries, operand_bytes, calls, report.collectives,
                        activation_gathers(report.hlo, parameter_sizes(config)), report.kernel_choices)


HEADER = ["| preset | mesh | temp MiB (x one chip) | kernel calls | kernel operand MiB (x one chip) | "
          "activation gathers | collectives (count, MiB) |", "|---|---|---|---|---|---|---|"]


def row(p: Partitioning, one: Partitioning | None) -> str:
    ratio = lambda a, b: f" ({a / b:.2f})" if one is not None and p is not one and b else ""  # noqa: E731
    comms = ", ".join(f"{k} {c}x {b / 2**20:.2f}" for k, (c, b) in sorted(p.collectives.items())) or "-"
    return (f"| {p.preset} | {p.mesh} | {p.temporaries / 2**20:.1f}{ratio(p.temporaries, one and one.temporaries)} | "
            f"{p.kernel_calls} | {p.kernel_operands / 2**20:.2f}{ratio(p.kernel_operands, one and one.kernel_operands)}"
            f" | {len(p.activation_gathers)} | {comms} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    parser.add_argument("--meshes", nargs="+", default=list(MESHES), choices=list(MESHES))
    args = parser.parse_args(argv)
    print(f"jax {jax.__version__}, v5e AOT from a CPU host, train step, global batch 32 x 256 (moe: 128 "
          "rows in 2 microbatches), 2 layers of d_model 128", flush=True)
    print("\n".join(HEADER), flush=True)
    for preset in args.presets:
        one = measure(preset, "data=1")
        print(row(one, one), flush=True)
        for mesh in args.meshes:
            print(row(measure(preset, mesh), one), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
