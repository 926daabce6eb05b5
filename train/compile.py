"""hybrax-compile --config configs/quickstart.yaml --topology v5e:2x4 [key=value ...]

Ahead-of-time compilation of the sharded train and eval steps for a TPU topology, on a machine
with no TPU (libtpu compiles for `jax.experimental.topologies` devices), in the spirit of
MaxText's `train_compile`: the step is built by the same functions the training loop uses
(`batch_spec`, `sharded_steps`), traced under the run's mesh with the TPU kernel dispatch
(`pallas_kernels.implementation.target_backend("tpu")`), and XLA's account of it is printed:

- memory per device: arguments + outputs - donated (aliased) + temporaries, against the chip's HBM;
- FLOPs per device: XLA's (compiled cost analysis; a loop body counts once, so grad_accum > 1
  undercounts) next to the model's (3 x flops_per_token x tokens for training, split evenly);
- every collective in the optimised HLO by kind, with its count and result bytes per device
  (an async `-start`/`-done` pair counts once; an op inside a loop body counts once);
- which kernel ran for each op, and the compile time.

    report = compile_step(config, topology_devices("v5e:2x4"), step="train")
    report.memory.total, report.flops, report.collectives["all-reduce"]   # (count, bytes)

Exit codes: 0 when every step fits the chip's HBM; 1 when one does not (one line); 2 for bad input
(config key, topology, mesh not matching the topology's devices).
"""

import argparse
import dataclasses
import importlib.util
import math
import os
import re
import sys
import time

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from hybrax.pallas_kernels import implementation
from hybrax.train.config import Config, ConfigError, check_devices, load_config
from hybrax.train.optim import learning_rate_schedule, make_optimizer
from hybrax.train.sharding import batch_sharding, make_mesh, state_shardings, with_shardings
from hybrax.train.step import BATCH_KEYS, abstract_state, make_eval_step, make_train_step
from hybrax.train.tokenizer import load_tokenizer

GiB = 2**30
# HBM per chip, by what `device.device_kind` reports (vendor data sheets).
HBM_PER_CHIP = {"TPU v4": 32 * GiB, "TPU v5 lite": 16 * GiB, "TPU v5": 95 * GiB, "TPU v6 lite": 32 * GiB}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "ragged-all-to-all",
               "collective-permute", "collective-broadcast")


class TopologyError(ValueError):
    """An unknown topology or chip, one line."""


class DoesNotFit(RuntimeError):
    """The step needs more HBM than the chip has, one line."""


# ---- the step's inputs and functions, shared with train.loop -------------------------------------

def batch_spec(config: Config, mesh) -> dict:
    """The global [B, T] batch as ShapeDtypeStructs with the batch sharding (train.sharding)."""
    B, T = config.data.batch_size, config.data.seq_len
    keys = BATCH_KEYS + (("modality_ids",) if config.data.modalities != "none" else ())
    return {k: jax.ShapeDtypeStruct((B, T), np.float32 if k == "loss_mask" else np.int32,
                                    sharding=batch_sharding(mesh, (B, T))) for k in keys}


def sharded_steps(config: Config, graphdef, optimizer, shardings, mesh):
    """(train_step, eval_step): the jitted steps of a run whose state has `shardings`; the new state
    keeps that layout and the metrics are replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    schedule = learning_rate_schedule(config.optim, config.train.steps)
    train_step = make_train_step(graphdef, optimizer, schedule, config.train.grad_accum, state_sharding=shardings,
                                 metrics_sharding=replicated)
    byte_lengths = load_tokenizer(config.data.tokenizer).byte_lengths()
    return train_step, make_eval_step(graphdef, byte_lengths, metrics_sharding=replicated)


# ---- topologies -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Topology:
    name: str              # e.g. "v5e:2x4"
    devices: list          # compile-only TPU devices
    device_kind: str       # e.g. "TPU v5 lite"
    hbm_bytes: int         # per device (one device per chip)


def _load_topology(name: str):
    from jax.experimental import topologies
    if importlib.util.find_spec("libtpu") is None:
        raise TopologyError("compiling for a TPU topology needs libtpu: pip install -e '.[test]' (or jax[tpu])")
    try:
        return topologies.get_topology_desc(name, "tpu").devices
    except Exception as e:  # noqa: BLE001 (libtpu raises JaxRuntimeError, or RuntimeError without libtpu)
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        bounds = re.fullmatch(r"\w+:(\d+(?:x\d+)*)", name)
        if "chips_per_host_bounds" not in message or bounds is None:
            raise TopologyError(f"unknown TPU topology {name!r} ({message}); e.g. v5e:2x4, v5p:2x2x1, v6e:2x2, "
                                "v4:2x2x1") from None
    # a topology smaller than one host (v5e:1x1, v5e:2x1): one host holds all of it
    dims = [int(d) for d in bounds.group(1).split("x")]
    return topologies.get_topology_desc(name, "tpu", chips_per_host_bounds=(dims + [1, 1, 1])[:3]).devices


def topology_devices(name: str) -> Topology:
    """The compile-only devices of a TPU topology ("v5e:2x4", "v5p:2x2x1", ...) and the HBM of each:
    one device per chip (v4's two cores are one "megacore" device, as JAX shows them on a v4 host)."""
    from jax.experimental import topologies
    devices = _load_topology(name)
    if len({d.core_on_chip for d in devices}) > 1:
        devices = topologies.get_topology_desc(name, "tpu", chip_config_name="megacore").devices
    kind = devices[0].device_kind
    if kind not in HBM_PER_CHIP:
        raise TopologyError(f"topology {name!r} has devices of kind {kind!r}, whose HBM is unknown; known: "
                            f"{sorted(HBM_PER_CHIP)}")
    return Topology(name, list(devices), kind, HBM_PER_CHIP[kind])


# ---- what XLA reports -----------------------------------------------------------------------------

_COLLECTIVE_LINE = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>.*?)\s*\b(?P<kind>"
                              + "|".join(sorted(COLLECTIVES, key=len, reverse=True))
                              + r")(?P<phase>-start|-done)?\(")
_ARRAY = re.compile(r"\b(?P<dtype>[a-z]+[0-9a-z]*)\[(?P<dims>[0-9,<=]*)\]")


def array_bytes(shape: str) -> int:
    """Bytes of an HLO shape string, e.g. "(f32[8,128]{1,0}, bf16[4]{0})" -> 4104 (tuples summed;
    a dtype's bit width is the first number in its name: bf16, f8e4m3fn, c64, s4; pred is 8)."""
    total = 0
    for array in _ARRAY.finditer(shape):
        dtype = array["dtype"]
        width = 8 if dtype == "pred" else int(re.search(r"\d+", dtype)[0]) if re.search(r"\d", dtype) else 0
        dims = [int(d.removeprefix("<=")) for d in array["dims"].split(",") if d]
        total += math.prod(dims) * width // 8
    return total


def collectives(hlo_text: str) -> dict[str, tuple[int, int]]:
    """{kind: (count, result bytes per device)} over every computation of an (optimised) HLO module.
    An async pair counts once, at its `-done` (whose result is the collective's result); ops that
    `async-start` wraps are counted in the computation they call."""
    found: dict[str, tuple[int, int]] = {}
    for line in hlo_text.splitlines():
        match = _COLLECTIVE_LINE.match(line)
        if match is None or match["phase"] == "-start":
            continue
        count, size = found.get(match["kind"], (0, 0))
        found[match["kind"]] = (count + 1, size + array_bytes(match["shape"]))
    return found


@dataclasses.dataclass(frozen=True)
class Memory:
    """XLA's compile-time account of one device's memory for a step, in bytes."""

    arguments: int
    outputs: int
    temporaries: int
    aliased: int           # outputs that reuse donated arguments
    hbm: int               # the chip's HBM per device

    @property
    def total(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries

    @property
    def fits(self) -> bool:
        return self.total <= self.hbm


def memory_of(compiled, hbm_bytes: int) -> Memory:
    analysis = compiled.memory_analysis()
    return Memory(analysis.argument_size_in_bytes, analysis.output_size_in_bytes, analysis.temp_size_in_bytes,
                  analysis.alias_size_in_bytes, hbm_bytes)


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get("flops", 0.0))


# ---- compile ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CompiledReport:
    step: str                                   # "train" or "eval"
    topology: Topology
    mesh_shape: dict[str, int]
    memory: Memory
    flops: float                                # per device, XLA's count
    model_flops: float                          # per device: (3 train, 1 eval) x flops_per_token x tokens / devices
    collectives: dict[str, tuple[int, int]]     # kind -> (count, result bytes per device)
    kernel_choices: list[str]                   # one line per op: which implementation ran
    lower_seconds: float
    compile_seconds: float
    compiled: object = dataclasses.field(repr=False)
    hlo: str = dataclasses.field(repr=False)    # optimised HLO text


def compile_step(config: Config, topology: Topology, *, step: str = "train") -> CompiledReport:
    """Lower and compile the sharded `step` ("train" or "eval") of `config` for `topology`'s devices.
    Raises ConfigError when the mesh or batch do not fit the device count, KernelRefused under
    model.kernels.strict, DoesNotFit when XLA runs out of HBM while compiling."""
    if step not in ("train", "eval"):
        raise ValueError(f"step={step!r} must be 'train' or 'eval'")
    mesh_shape = check_devices(config, len(topology.devices))
    mesh = make_mesh(config.mesh, topology.devices)
    optimizer = make_optimizer(config.optim, config.train.steps)
    graphdef, abstract = abstract_state(config.model, optimizer)   # outside the mesh, as train.loop does
    kernels = getattr(config.model, "kernels", None)
    with jax.set_mesh(mesh), implementation.target_backend("tpu"), \
            implementation.kernel_policy(strict=getattr(kernels, "strict", False)) as choices:
        shardings = state_shardings(abstract, mesh)
        state = with_shardings(abstract, shardings)
        train_step, eval_step = sharded_steps(config, graphdef, optimizer, shardings, mesh)
        batch = batch_spec(config, mesh)
        t0 = time.perf_counter()
        if step == "train":
            lowered = train_step.lower(state, batch)
        else:
            lowered = eval_step.lower(state.params, state.model_state, batch)
        t1 = time.perf_counter()
        try:
            compiled = lowered.compile()
        except Exception as e:  # noqa: BLE001 (XLA raises JaxRuntimeError)
            if "RESOURCE_EXHAUSTED" in str(e) or "Ran out of memory" in str(e):
                first_line = str(e).strip().splitlines()[0]   # "RESOURCE_EXHAUSTED: Ran out of memory ..."
                raise DoesNotFit(f"{step} step does not fit {topology.device_kind} HBM: {first_line}") from None
            raise
        t2 = time.perf_counter()
    hlo = compiled.as_text()
    tokens = config.data.batch_size * config.data.seq_len
    model_flops = (3 if step == "train" else 1) * config.model.flops_per_token(config.data.seq_len) * tokens
    return CompiledReport(step, topology, mesh_shape, memory_of(compiled, topology.hbm_bytes), _flops(compiled),
                          model_flops / len(topology.devices), collectives(hlo), choices.report(), t1 - t0, t2 - t1,
                          compiled, hlo)


# ---- the table ------------------------------------------------------------------------------------

def _collective(count_and_bytes: tuple[int, int]) -> str:
    return f"{count_and_bytes[0]} x, {_size(count_and_bytes[1])}"


def _size(n: float) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{int(n)} B"


def format_reports(config_path: str, reports: list[CompiledReport]) -> str:
    first = reports[0]
    topo = first.topology
    mesh = ", ".join(f"{axis}={size}" for axis, size in first.mesh_shape.items())
    head = [f"{config_path} on {topo.name}: {len(topo.devices)} x {topo.device_kind} "
            f"({_size(topo.hbm_bytes)} HBM per device), mesh {mesh}"]
    head += [f"kernel {line}" for line in dict.fromkeys(c for r in reports for c in r.kernel_choices)]
    rows = [("per device", [f"{r.step} step" for r in reports])]
    rows += [(name, [_size(getattr(r.memory, field)) for r in reports])
             for name, field in (("arguments", "arguments"), ("outputs", "outputs"), ("temporaries", "temporaries"),
                                 ("donated (aliased)", "aliased"), ("total", "total"))]
    rows.append(("of HBM", [f"{100 * r.memory.total / r.memory.hbm:.1f}%" for r in reports]))
    rows.append(("FLOPs (XLA)", [f"{r.flops:.4g}" for r in reports]))
    rows.append(("FLOPs (model)", [f"{r.model_flops:.4g}" for r in reports]))
    for kind in [k for k in COLLECTIVES if any(k in r.collectives for r in reports)]:
        rows.append((kind, [_collective(r.collectives.get(kind, (0, 0))) for r in reports]))
    rows.append(("lower + compile", [f"{r.lower_seconds:.1f} s + {r.compile_seconds:.1f} s" for r in reports]))
    width = max(len(name) for name, _ in rows)
    cells = [max(len(v[i]) for _, v in rows) for i in range(len(reports))]
    table = [f"{name:<{width}}  " + "  ".join(f"{v:>{w}}" for v, w in zip(values, cells)) for name, values in rows]
    return "\n".join(head + table)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="hybrax-compile",
                                description="Compile the sharded train and eval steps for a TPU topology, "
                                            "ahead of time, and print memory, FLOPs and collectives per device.")
    p.add_argument("--config", required=True, help="YAML preset, e.g. configs/quickstart.yaml")
    p.add_argument("--topology", required=True, help="TPU topology, e.g. v5e:2x4, v5p:2x2x1, v6e:2x2")
    p.add_argument("--step", choices=("train", "eval", "both"), default="both")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.num_layers=6 mesh.fsdp=2")
    args = p.parse_args(argv)
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")   # compile-only: no chip is claimed
    try:
        config = load_config(args.config, args.overrides)
        topology = topology_devices(args.topology)
        steps = ("train", "eval") if args.step == "both" else (args.step,)
        reports = [compile_step(config, topology, step=step) for step in steps]
    except (ConfigError, TopologyError, implementation.KernelRefused) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DoesNotFit as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_reports(args.config, reports))
    too_big = [r for r in reports if not r.memory.fits]
    if too_big:
        r = too_big[0]
        print(f"error: {r.step} step needs {_size(r.memory.total)} per device, more than the "
              f"{_size(r.memory.hbm)} HBM of a {r.topology.device_kind} device", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
