"""The training loop: build, resume, step, log, evaluate, checkpoint, sample.

Everything runs under the mesh of the `mesh` config (`jax.set_mesh`): the state is created (or
restored, onto whatever mesh shape this run has) already sharded, batches are placed in zigzag
order (train.sharding), and the step keeps the state's layout. In a multi-process run
(`jax.distributed`, train.distributed) every process runs this same loop; only process 0 writes
the log, metrics, config and samples, and all of them write the checkpoint together.

Exit codes: 0 when the run finishes or stops on SIGTERM (after saving a checkpoint); 1 when the
loss stops being finite (nothing is saved, so the last good checkpoint stays the latest).
"""

import os
import pathlib
import signal
import threading
import time

import jax
from jax.experimental import multihost_utils
from tqdm import tqdm

from hybrax.pallas_kernels.implementation import current_choices, kernel_policy
from hybrax.train.checkpoint import CheckpointMismatch, Checkpointer
from hybrax.train.compile import batch_spec, memory_of, sharded_steps
from hybrax.train.config import Config, check_devices
from hybrax.train.data import build_datasets, validation_batches
from hybrax.train.hardware import peak_flops_per_device
from hybrax.train.metrics import MetricsWriter, console_line, is_finite, plain
from hybrax.train.optim import make_optimizer
from hybrax.train.sample import generate
from hybrax.train.sharding import (create_sharded, make_mesh, process_rows, shard_batch, state_shardings, to_host,
                            with_shardings)
from hybrax.train.step import create_model, init_state, merge_model, summarize_eval
from hybrax.train.step import abstract_state as abstract_train_state


class _Termination:
    """Remembers a SIGTERM so the loop can save and exit at the end of the current step."""

    def __init__(self):
        self.requested = False
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True


def _write_atomically(path: pathlib.Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _memory_line(compiled) -> str:
    """XLA's compile-time account of one device's memory for a step (train.compile.Memory)."""
    if compiled.memory_analysis() is None:
        return "not reported by this backend"
    m = memory_of(compiled, hbm_bytes=0)
    mib = lambda n: f"{n / 2**20:,.1f} MiB"  # noqa: E731
    return (f"peak {mib(m.total)} = arguments {mib(m.arguments)} + outputs {mib(m.outputs)} - donated "
            f"{mib(m.aliased)} + temporaries {mib(m.temporaries)}")


def evaluate(eval_step, state, batches, mesh) -> dict:
    sums = {"nll": 0.0, "tokens": 0.0, "byte_nll": 0.0, "bytes": 0.0}
    for batch in batches:
        out = to_host(eval_step(state.params, state.model_state, shard_batch(batch, mesh)))
        for key in sums:
            sums[key] += float(out[key])
    return summarize_eval(sums)


def train(config: Config, run_dir: str | pathlib.Path, *, log=print) -> int:
    run_dir = pathlib.Path(run_dir)
    mesh_shape = check_devices(config, jax.device_count())
    mesh = make_mesh(config.mesh)
    lead = jax.process_index() == 0
    if not lead:
        log = lambda *args, **kwargs: None  # noqa: E731 (only process 0 logs)
    optimizer = make_optimizer(config.optim, config.train.steps)
    graphdef, abstract = abstract_train_state(config.model, optimizer)  # outside the mesh: nnx would apply
    with jax.set_mesh(mesh), kernel_policy(strict=config.model.kernels.strict):  # the logical names as mesh
        code, state = _train(config, run_dir, mesh, mesh_shape, optimizer, graphdef, abstract, lead, log)  # axes
    if code == 0 and state is not None and config.log.sample_tokens > 0:
        _sample(config, run_dir, graphdef, state, lead, log)
    return code


def _sample(config: Config, run_dir: pathlib.Path, graphdef, state, lead: bool, log) -> None:
    """A sample from process 0, on one device, from a full host copy of the (sharded) state."""
    params = multihost_utils.process_allgather(state.params, tiled=True)
    model_state = multihost_utils.process_allgather(state.model_state, tiled=True)
    if not lead:
        return
    model = merge_model(graphdef, state.replace(params=params, model_state=model_state))
    text = generate(model, config.log.sample_prompt, max_new_tokens=config.log.sample_tokens, seed=config.train.seed)
    _write_atomically(run_dir / "samples.txt", text + "\n")
    log(f"sample ({run_dir / 'samples.txt'}):\n{text}")


def _train(config: Config, run_dir: pathlib.Path, mesh, mesh_shape: dict, optimizer, graphdef, abstract,
           lead: bool, log):
    """(exit code, final state or None when stopped early)."""
    if lead:
        run_dir.mkdir(parents=True, exist_ok=True)
    multihost_utils.sync_global_devices("run directory")
    log(f"resolved config:\n{config.to_yaml()}")

    rows = process_rows(mesh, config.data.batch_size, config.data.seq_len)   # this process's share
    data = build_datasets(config.data, config.train.seed, row_range=rows)
    steps, seed = config.train.steps, config.train.seed
    checkpointer = Checkpointer(run_dir, config.checkpoint)
    start = checkpointer.latest_step() or 0
    shardings = state_shardings(abstract, mesh)
    if start:
        try:
            state, data_state = checkpointer.restore(start, with_shardings(abstract, shardings))
        except CheckpointMismatch:
            checkpointer.close()
            raise
        data.train.restore(data_state)
        log(f"resumed from checkpoint at step {start} ({checkpointer.directory})")
    else:
        state = create_sharded(lambda: init_state(create_model(config.model, seed), optimizer)[1], shardings)
    if lead:
        _write_atomically(run_dir / "config.yaml", config.to_yaml())  # only once the checkpoint fits it

    B, T = config.data.batch_size, config.data.seq_len
    train_step, eval_step = sharded_steps(config, graphdef, optimizer, shardings, mesh)
    t0 = time.perf_counter()
    train_step = train_step.lower(state, batch_spec(config, mesh)).compile()
    compile_s = time.perf_counter() - t0
    log(f"train step memory per device: {_memory_line(train_step)}")
    for line in current_choices().report():   # which kernel each op runs, and why the others did not
        log(f"kernel {line}")

    num_params, active_params = config.model.num_params(), config.model.num_active_params()
    train_flops_per_token = 3 * config.model.flops_per_token(T)
    peak, peak_source = peak_flops_per_device(config.model.dtype)
    # a measured CPU peak is the whole host's (every core); fake CPU devices share it
    peak *= jax.process_count() if jax.default_backend() == "cpu" else jax.device_count()
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    active = f" ({active_params:,} active per token)" if active_params != num_params else ""
    log(f"model: {num_params:,} parameters{active}, {train_flops_per_token / 1e6:.1f} MFLOP/token (train), "
        f"state {state_bytes / 2**20:.1f} MiB | data: {data.train_bytes:,} train bytes, {data.val_bytes:,} val bytes"
        f" | mesh {mesh_shape} ({jax.process_count()} processes) | compile {compile_s:.1f}s"
        f" | peak {peak / 1e12:.3f} TFLOP/s ({peak_source})")

    writer = MetricsWriter(run_dir, tensorboard=config.log.tensorboard) if lead else None
    termination = _Termination()
    bar = tqdm(total=steps, initial=start, disable=not (lead and config.log.progress_bar), dynamic_ncols=True,
               mininterval=1.0)
    window_tokens, window_time = 0, 0.0
    try:
        for step in range(start + 1, steps + 1):
            batch = shard_batch(next(data.train), mesh, batch_size=B, row_start=rows[0])
            t = time.perf_counter()
            state, metrics = train_step(state, batch)
            metrics = to_host(metrics)
            loss = float(metrics["loss"])
            window_time += time.perf_counter() - t
            window_tokens += B * T
            if not is_finite(loss):
                last = checkpointer.latest_step()
                log(f"error: loss is {loss} at step {step}; stopped without saving, the last good checkpoint "
                    f"is step {last} in {checkpointer.directory}")
                return 1, None
            bar.update(1)
            if lead and (step % config.train.log_every == 0 or step == steps):
                rate = window_tokens / window_time
                record = {"loss": loss, "lr": float(metrics["lr"]), "grad_norm": float(metrics["grad_norm"]),
                          "tokens_per_s": rate, "tflops": rate * train_flops_per_token / 1e12,
                          "mfu": rate * train_flops_per_token / peak,
                          **{k: plain(v) for k, v in metrics.items() if k.startswith("aux")}}
                writer.write(step, record)
                bar.write(console_line(step, steps, record))
                window_tokens, window_time = 0, 0.0
            if step % config.train.eval_every == 0 or step == steps:
                batches = validation_batches(data, config.data, config.train.eval_batches)
                record = evaluate(eval_step, state, batches, mesh)
                if lead:
                    writer.write(step, record)
                    bar.write(console_line(step, steps, {"loss": loss, **record}))
            if step % config.checkpoint.every == 0 or step == steps or termination.requested:
                checkpointer.save(step, state, data.train.state(), wait=termination.requested)
            if termination.requested:
                log(f"SIGTERM: saved checkpoint at step {step} in {checkpointer.directory}; exiting")
                return 0, None
    finally:
        bar.close()
        if writer is not None:
            writer.close()
        checkpointer.close()

    return 0, state
