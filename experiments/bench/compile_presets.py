"""`train.compile` over every preset: per-device memory and collective bytes of each train step on
one TPU topology, as a markdown table.

    python experiments/bench/compile_presets.py [--topology v5e:2x4] [--presets quickstart moe] [key=value ...]

Each preset compiles as shipped (its own mesh, `-1` taking the topology's chips; `model.kernels`
auto, so what a user gets: splash attention and XLA for the ops whose Pallas kernels are not yet
verified on a TPU); overrides apply to every preset (e.g. `model.kernels.linear_attention=pallas`).
"""

import argparse
import os
import pathlib
import sys

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))   # the checkout, when not installed

from hybrax.configs import DIRECTORY  # noqa: E402
from hybrax.train.compile import COLLECTIVES, DoesNotFit, compile_step, topology_devices  # noqa: E402
from hybrax.train.config import load_config  # noqa: E402

MiB = 2**20


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", default="v5e:2x4")
    parser.add_argument("--presets", nargs="+", default=sorted(p.stem for p in DIRECTORY.glob("*.yaml")))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    topology = topology_devices(args.topology)
    print(f"train step per device on {args.topology} ({len(topology.devices)} x {topology.device_kind}, "
          f"{topology.hbm_bytes / 2**30:.0f} GiB HBM); MiB; collectives as count x MiB")
    print("| preset | mesh | arguments | temporaries | total (of HBM) | " + " | ".join(COLLECTIVES) + " | kernels |")
    print("|---|---|---|---|---|" + "---|" * len(COLLECTIVES) + "---|")
    for preset in args.presets:
        config = load_config(f"{preset}.yaml", args.overrides)
        try:
            r = compile_step(config, topology, step="train")
        except DoesNotFit as e:
            print(f"| {preset} | | | | does not fit: {e} |" + " |" * len(COLLECTIVES), flush=True)
            continue
        mesh = ",".join(f"{a}={n}" for a, n in r.mesh_shape.items() if n > 1) or "1 chip"
        m = r.memory
        comms = [f"{r.collectives[k][0]} x {r.collectives[k][1] / MiB:.2f}" if k in r.collectives else "-"
                 for k in COLLECTIVES]
        kernels = "; ".join(line.split(" (")[0] for line in r.kernel_choices)
        print(f"| {preset} | {mesh} | {m.arguments / MiB:.1f} | {m.temporaries / MiB:.1f} | {m.total / MiB:.1f} "
              f"({100 * m.total / m.hbm:.1f}%) | " + " | ".join(comms) + f" | {kernels} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
