"""hybrax-train --config configs/quickstart.yaml [--run-dir DIR] [key=value ...]

Multi-process (train.distributed): add --coordinator HOST:PORT --num-processes N --process-id I
(or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), or --distributed on a cluster
JAX detects by itself.
"""

import argparse
import pathlib
import sys

import yaml

from hybrax.train import termination
from hybrax.train.config import ConfigError, load_config
from hybrax.train.settings import format_keys, list_keys, resolved_tree


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="hybrax-train", description="Train a hybrax model from a YAML preset.")
    p.add_argument("--config", help="YAML preset, e.g. configs/quickstart.yaml")
    p.add_argument("--run-dir", default=None, help="run directory (default: runs/<config name>)")
    p.add_argument("--coordinator", default=None, help="multi-process: address host:port of process 0")
    p.add_argument("--num-processes", type=int, default=None, help="multi-process: number of processes")
    p.add_argument("--process-id", type=int, default=None, help="multi-process: this process's id")
    p.add_argument("--distributed", action="store_true", help="multi-process with cluster auto-detection")
    p.add_argument("--print-config", action="store_true", help="print the resolved config tree and exit")
    p.add_argument("--list-keys", action="store_true", help="print every key with its type, default and doc, and exit")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.num_layers=6 optim.lr=1e-3")
    args = p.parse_args(argv)
    termination.listen()   # SIGTERM from here on exits 0 (train/termination.py), never -15
    if args.list_keys:
        print(format_keys(list_keys()))
        return 0
    if args.config is None:
        p.error("--config is required (a preset path or a shipped preset name such as quickstart.yaml)")
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as e:  # reported before any compute
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(yaml.safe_dump(resolved_tree(config), sort_keys=False), end="")
        return 0
    from hybrax.train import distributed

    try:
        distributed.initialize(distributed.settings(args.coordinator, args.num_processes, args.process_id),
                               auto=args.distributed)
    except distributed.DistributedConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from hybrax.pallas_kernels.implementation import KernelRefused
    from hybrax.train.checkpoint import CheckpointMismatch
    from hybrax.train.loop import train

    from hybrax.train.run_lock import RunDirectoryInUse

    run_dir = pathlib.Path(args.run_dir or pathlib.Path("runs") / pathlib.Path(args.config).stem)
    try:
        return train(config, run_dir)
    except (ConfigError, CheckpointMismatch, KernelRefused) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunDirectoryInUse as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
