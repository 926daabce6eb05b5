"""A training run, built once: mesh, data, state (fresh or restored), compiled steps, checkpointer and
metrics writer, everything train.loop needs to step.

`build_run` sets up in the order the log reports it: the resolved config, the checkpoint it resumes
from, the train step's memory per device, the kernel each op runs, then one line with the model,
data, mesh, compile time and peak FLOP/s. The abstract state is built before the mesh is entered
(under `jax.set_mesh`, nnx would apply the logical axis names as mesh axes); everything after, the
loop included, runs under the mesh and the model's kernel policy.
"""

import contextlib
import dataclasses
import os
import pathlib
import time
from typing import Callable, Iterator

import jax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from hybrax.pallas_kernels.implementation import current_choices, kernel_policy
from hybrax.train.checkpoint import Checkpointer
from hybrax.train.compile import batch_spec, memory_of, sharded_steps
from hybrax.train.config import Config, check_devices
from hybrax.train.data import Datasets, build_datasets
from hybrax.train.hardware import peak_flops_per_device
from hybrax.train.metrics import MetricsWriter
from hybrax.train.optim import device_state_bytes, make_optimizer, state_bytes
from hybrax.train.run_directory import OnChange, check_config, check_steps, keep_old_config, move_aside
from hybrax.train.run_lock import run_directory_lock
from hybrax.train.sharding import create_sharded, make_mesh, process_rows, state_shardings, with_shardings
from hybrax.train.step import TrainState, create_model, init_state
from hybrax.train.step import abstract_state as abstract_train_state


@dataclasses.dataclass
class Run:
    """Everything the loop needs. `state` is the state at step `start` (0 for a fresh run)."""

    config: Config
    run_dir: pathlib.Path
    lead: bool                      # process 0: the one that writes the log, metrics, config and samples
    log: Callable[..., None]        # silent on every other process
    mesh: Mesh
    rows: tuple[int, int]           # this process's rows of each global batch
    data: Datasets
    checkpointer: Checkpointer
    writer: MetricsWriter | None    # None off process 0
    graphdef: nnx.GraphDef
    state: TrainState
    start: int
    train_step: Callable            # compiled: (state, batch) -> (state, metrics)
    eval_step: Callable             # (params, model_state, batch) -> sums of nll, tokens, byte_nll, bytes
    train_flops_per_token: float    # forward and backward
    peak_flops: float               # FLOP/s of all the run's devices, the denominator of MFU


@contextlib.contextmanager
def build_run(config: Config, run_dir: pathlib.Path, *, on_change: OnChange = OnChange.REFUSE,
              log=print) -> Iterator[Run]:
    """Builds the run and yields it under its mesh and kernel policy; on the way out, even on an
    error, closes the metrics writer and then the checkpointer (which waits for its last save).
    `on_change`: what to do when the run directory was started with another config
    (train.run_directory)."""
    mesh_shape = check_devices(config, jax.device_count())
    mesh = make_mesh(config.mesh)
    lead = jax.process_index() == 0
    log = log if lead else _silent
    optimizer = make_optimizer(config.optim, config.train.steps)
    graphdef, abstract = abstract_train_state(config.model, optimizer)  # outside the mesh (module docstring)
    with jax.set_mesh(mesh), kernel_policy(strict=config.model.kernels.strict), contextlib.ExitStack() as closing:
        if lead:
            run_dir.mkdir(parents=True, exist_ok=True)
            closing.enter_context(run_directory_lock(run_dir))   # a second trainer fails here, in one line

        accepted = check_config(run_dir, config, on_change)   # ConfigChanged: one line, before any compute
        if lead and on_change is OnChange.FRESH and (moved := move_aside(run_dir)) is not None:
            log(f"--fresh: the previous run in {run_dir} was moved to {moved}")
        multihost_utils.sync_global_devices("run directory checked")
        log(f"resolved config:\n{config.to_yaml()}")

        rows = process_rows(mesh, config.data.batch_size, config.data.seq_len)
        data = build_datasets(config.data, config.train.seed, row_range=rows,
                              modality_groups=config.model.modality_groups())
        checkpointer = Checkpointer(run_dir, config.checkpoint, log=log)
        closing.callback(checkpointer.close)
        shardings = state_shardings(abstract, mesh)
        # onto whatever mesh shape this run has; CheckpointMismatch when the model differs
        restored = checkpointer.restore_latest(with_shardings(abstract, shardings))
        if restored is not None:
            start, state, data_state = restored
            check_steps(run_dir, config, start)
            data.train.restore(data_state)
            log(f"resumed from checkpoint at step {start} ({checkpointer.directory})")
        else:
            start, seed = 0, config.train.seed
            state = create_sharded(lambda: init_state(create_model(config.model, seed), optimizer)[1], shardings)
        if lead:   # only once the checkpoint fits it
            if accepted:
                kept = keep_old_config(run_dir, start)
                log(f"--resume: the config changed at step {start} ({'; '.join(accepted)}); the old one is {kept}")
            write_atomically(run_dir / "config.yaml", config.to_yaml())

        train_step, eval_step = sharded_steps(config, graphdef, optimizer, shardings, mesh)
        t0 = time.perf_counter()
        train_step = train_step.lower(state, batch_spec(config, mesh)).compile()
        compile_s = time.perf_counter() - t0
        log(f"train step memory per device: {_memory_line(train_step)}")
        log(_optimizer_line(config, state))
        for line in current_choices().report():   # which kernel each op runs, and why the others did not
            log(f"kernel {line}")

        peak_flops, peak_source = _peak_flops(config)
        writer = MetricsWriter(run_dir, start=start, tensorboard=config.log.tensorboard) if lead else None
        if writer is not None:
            closing.callback(writer.close)
        run = Run(config=config, run_dir=run_dir, lead=lead, log=log, mesh=mesh, rows=rows, data=data,
                  checkpointer=checkpointer, writer=writer, graphdef=graphdef, state=state, start=start,
                  train_step=train_step, eval_step=eval_step, peak_flops=peak_flops,
                  train_flops_per_token=3 * config.model.flops_per_token(config.data.seq_len))
        log(_summary_line(run, mesh_shape, compile_s, peak_source))
        yield run


def write_atomically(path: pathlib.Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _silent(*args, **kwargs) -> None:
    pass


def _memory_line(compiled) -> str:
    """XLA's compile-time account of one device's memory for a step (train.compile.Memory)."""
    if compiled.memory_analysis() is None:
        return "not reported by this backend"
    m = memory_of(compiled, hbm_bytes=0)
    mib = lambda n: f"{n / 2**20:,.1f} MiB"  # noqa: E731
    return (f"peak {mib(m.total)} = arguments {mib(m.arguments)} + outputs {mib(m.outputs)} - donated "
            f"{mib(m.aliased)} + temporaries {mib(m.temporaries)}")


def _peak_flops(config: Config) -> tuple[float, str]:
    """(peak FLOP/s of all the run's devices, where the per-device number came from)."""
    peak, source = peak_flops_per_device(config.model.dtype)
    # a measured CPU peak is the whole host's (every core); fake CPU devices share it
    return peak * (jax.process_count() if jax.default_backend() == "cpu" else jax.device_count()), source


def _decoding_cache(model) -> str:
    """The decoding cache per sequence: what grows per token and the fixed part (recurrent states)."""
    per_token, fixed = model.kv_cache_bytes_per_token(), model.state_bytes_per_sequence()
    fixed_part = f" + {fixed / 1024:,.1f} KiB/sequence" if fixed else ""
    return f"decoding cache {per_token / 1024:,.2f} KiB/token{fixed_part}"


def _optimizer_line(config: Config, state: TrainState) -> str:
    """The optimizer's state, exactly from its tree: bytes in all, per parameter, and on one device."""
    total, params = state_bytes(state.opt_state), sum(x.size for x in jax.tree.leaves(state.params))
    device = device_state_bytes(state.opt_state, jax.local_devices()[0])
    return (f"optimizer {config.optim.name}: state {total / 2**20:.2f} MiB, {total / params:.2f} bytes per parameter "
            f"(AdamW: 8), {device / 2**20:.2f} MiB on device 0")


def _summary_line(run: Run, mesh_shape: dict, compile_s: float, peak_source: str) -> str:
    model, data = run.config.model, run.data
    num_params, active_params = model.num_params(), model.num_active_params()
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(run.state))
    active = f" ({active_params:,} active per token)" if active_params != num_params else ""
    return (f"model: {num_params:,} parameters{active}, {run.train_flops_per_token / 1e6:.1f} MFLOP/token (train), "
            f"state {state_bytes / 2**20:.1f} MiB, {_decoding_cache(model)} | data: {data.train_bytes:,} train bytes, "
            f"{data.val_bytes:,} val bytes | mesh {mesh_shape} ({jax.process_count()} processes) | compile "
            f"{compile_s:.1f}s | peak {run.peak_flops / 1e12:.3f} TFLOP/s ({peak_source})")
