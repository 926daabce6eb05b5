"""hybrax-train --config configs/quickstart.yaml [--run-dir DIR] [--resume | --fresh] [key=value ...]

Every anticipated failure is one line on stderr, `error: ...`, and an exit status: 2 for what the
command asked for (a config value, a data file, a config that differs from the run directory's, a
checkpoint of another model, a refused kernel), 1 for what happened while running (the run
directory in use, no checkpoint restores, a save failed, a file system error, a non-finite loss).
A traceback is a bug.

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
    change = p.add_mutually_exclusive_group()
    change.add_argument("--resume", action="store_true",
                        help="the run directory was started with another config: continue it with this one")
    change.add_argument("--fresh", action="store_true",
                        help="start over in the run directory (the previous run is moved to <run dir>/replaced/)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config tree and exit")
    p.add_argument("--list-keys", action="store_true", help="print every key with its type, default and doc, and exit")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.num_layers=6 optim.lr=1e-3")
    args = p.parse_intermixed_args(argv)   # flags may follow the overrides
    termination.listen()   # SIGTERM from here on exits 0 (train/termination.py), never -15
    termination.follow_parent()   # under hybrax-sweep: SIGTERM when the sweep dies
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
    from hybrax.train.checkpoint import CheckpointMismatch, CheckpointSaveFailed, CheckpointUnreadable
    from hybrax.train.corpus import DataError
    from hybrax.train.loop import train
    from hybrax.train.run_directory import OnChange
    from hybrax.train.run_lock import RunDirectoryInUse

    run_dir = pathlib.Path(args.run_dir or pathlib.Path("runs") / pathlib.Path(args.config).stem)
    on_change = OnChange.RESUME if args.resume else OnChange.FRESH if args.fresh else OnChange.REFUSE
    try:
        return train(config, run_dir, on_change=on_change)
    except (ConfigError, CheckpointMismatch, KernelRefused, DataError) as e:   # what the user asked for
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (RunDirectoryInUse, CheckpointUnreadable, CheckpointSaveFailed, OSError) as e:   # what happened
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
