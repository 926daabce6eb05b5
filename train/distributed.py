"""Multi-process runs through `jax.distributed`: one process per host (or several CPU processes
on one machine, for tests), all running the same `hybrax-train` command.

    hybrax-train --config C --coordinator host0:1234 --num-processes 2 --process-id 0   # on host 0
    hybrax-train --config C --coordinator host0:1234 --num-processes 2 --process-id 1   # on host 1

or the same through the environment: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID.
On clusters JAX can detect by itself (SLURM, Open MPI, Kubernetes/GKE, Cloud TPU),
`--distributed` alone calls `jax.distributed.initialize()` and lets it find them. Nothing set: a
single-process run. CPU processes exchange collectives over gloo.
"""

import os

import jax
import numpy as np
from jax.experimental import multihost_utils


class DistributedConfigError(ValueError):
    """Incomplete multi-process settings, one line."""


def settings(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
             environ=os.environ) -> dict | None:
    """The `jax.distributed.initialize` arguments from flags (first) or the environment; None when
    neither names a coordinator."""
    coordinator = coordinator or environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(environ["JAX_NUM_PROCESSES"])
    if process_id is None and environ.get("JAX_PROCESS_ID"):
        process_id = int(environ["JAX_PROCESS_ID"])
    if coordinator is None:
        if num_processes is not None or process_id is not None:
            raise DistributedConfigError("--num-processes/--process-id (or JAX_NUM_PROCESSES/JAX_PROCESS_ID) need a "
                                         "coordinator: --coordinator host:port or JAX_COORDINATOR_ADDRESS")
        return None
    if num_processes is None or process_id is None:
        raise DistributedConfigError(f"coordinator {coordinator!r} is set, but the number of processes and this "
                                     f"process's id are not (--num-processes N --process-id I)")
    if not 0 <= process_id < num_processes:
        raise DistributedConfigError(f"process id {process_id} must be in [0, {num_processes})")
    return {"coordinator_address": coordinator, "num_processes": num_processes, "process_id": process_id}


def initialize(arguments: dict | None, *, auto: bool = False) -> None:
    """Start `jax.distributed` with `arguments` (from `settings`), or with cluster auto-detection
    when `auto`; do nothing for a single-process run. Must run before any other JAX call."""
    if arguments is None and not auto:
        return
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**(arguments or {}))


def preemption_reached(step: int) -> bool:
    """In a multi-process run, JAX's preemption service (started by `jax.distributed.initialize`)
    takes SIGTERM from this hybrax's handler: any process's notice is shared, and every process gets
    True at the same step, the one to save at. Must be called at every step; False in a
    single-process run or when the service is off."""
    from jax._src import distributed as jax_distributed

    if jax.process_count() == 1 or jax_distributed.global_state.preemption_sync_manager is None:
        return False
    return multihost_utils.reached_preemption_sync_point(step)


def any_process(*flags: bool) -> list[bool]:
    """Each flag ORed over all processes: decisions every process then takes together (a collective
    save, a stop). One small all-gather per call in a multi-process run; free otherwise."""
    if jax.process_count() == 1:
        return [bool(f) for f in flags]
    gathered = multihost_utils.process_allgather(np.asarray(flags, dtype=np.int32))
    return [bool(f) for f in np.asarray(gathered).reshape(-1, len(flags)).any(axis=0)]
