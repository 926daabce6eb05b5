"""The training loop: build, resume, step, log, evaluate, checkpoint, sample.

Exit codes: 0 when the run finishes or stops on SIGTERM (after saving a checkpoint); 1 when the
loss stops being finite (nothing is saved, so the last good checkpoint stays the latest).
"""

import os
import pathlib
import signal
import threading
import time

import jax
import numpy as np
from tqdm import tqdm

from train.checkpoint import CheckpointMismatch, Checkpointer
from train.config import Config, check_devices
from train.data import build_datasets, validation_batches
from train.hardware import peak_flops_per_device
from train.metrics import MetricsWriter, console_line, is_finite, plain
from train.optim import learning_rate_schedule, make_optimizer
from train.sample import generate
from train.step import (BATCH_KEYS, create_model, init_state, make_eval_step, make_train_step, merge_model,
                        summarize_eval)
from train.step import abstract_state as abstract_train_state


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


def evaluate(eval_step, state, batches) -> dict:
    sums = {"nll": 0.0, "tokens": 0.0, "byte_nll": 0.0, "bytes": 0.0}
    for batch in batches:
        out = jax.device_get(eval_step(state.params, state.model_state, batch))
        for key in sums:
            sums[key] += float(out[key])
    return summarize_eval(sums)


def train(config: Config, run_dir: str | pathlib.Path, *, log=print) -> int:
    run_dir = pathlib.Path(run_dir)
    mesh_shape = check_devices(config, jax.device_count())
    run_dir.mkdir(parents=True, exist_ok=True)
    log(f"resolved config:\n{config.to_yaml()}")

    data = build_datasets(config.data, config.train.seed)
    steps, seed = config.train.steps, config.train.seed
    optimizer = make_optimizer(config.optim, steps)
    schedule = learning_rate_schedule(config.optim, steps)
    checkpointer = Checkpointer(run_dir, config.checkpoint)
    start = checkpointer.latest_step() or 0
    if start:
        graphdef, target = abstract_train_state(config.model, optimizer)
        try:
            state, data_state = checkpointer.restore(start, target)
        except CheckpointMismatch:
            checkpointer.close()
            raise
        data.train.restore(data_state)
        log(f"resumed from checkpoint at step {start} ({checkpointer.directory})")
    else:
        graphdef, state = init_state(create_model(config.model, seed), optimizer)
    _write_atomically(run_dir / "config.yaml", config.to_yaml())  # only once the checkpoint fits it

    B, T = config.data.batch_size, config.data.seq_len
    batch_spec = {k: jax.ShapeDtypeStruct((B, T), np.float32 if k == "loss_mask" else np.int32) for k in BATCH_KEYS}
    t0 = time.perf_counter()
    train_step = make_train_step(graphdef, optimizer, schedule, config.train.grad_accum).lower(state, batch_spec).compile()
    compile_s = time.perf_counter() - t0
    eval_step = make_eval_step(graphdef)

    num_params, active_params = config.model.num_params(), config.model.num_active_params()
    train_flops_per_token = 3 * config.model.flops_per_token(T)
    peak, peak_source = peak_flops_per_device(config.model.dtype)
    peak *= jax.device_count()
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    active = f" ({active_params:,} active per token)" if active_params != num_params else ""
    log(f"model: {num_params:,} parameters{active}, {train_flops_per_token / 1e6:.1f} MFLOP/token (train), "
        f"state {state_bytes / 2**20:.1f} MiB | data: {data.train_bytes:,} train bytes, {data.val_bytes:,} val bytes"
        f" | mesh {mesh_shape} | compile {compile_s:.1f}s | peak {peak / 1e12:.3f} TFLOP/s ({peak_source})")

    writer = MetricsWriter(run_dir, tensorboard=config.log.tensorboard)
    termination = _Termination()
    bar = tqdm(total=steps, initial=start, disable=not config.log.progress_bar, dynamic_ncols=True, mininterval=1.0)
    window_tokens, window_time = 0, 0.0
    try:
        for step in range(start + 1, steps + 1):
            batch = next(data.train)
            t = time.perf_counter()
            state, metrics = train_step(state, batch)
            loss = float(metrics["loss"])
            window_time += time.perf_counter() - t
            window_tokens += B * T
            if not is_finite(loss):
                last = checkpointer.latest_step()
                log(f"error: loss is {loss} at step {step}; stopped without saving, the last good checkpoint "
                    f"is step {last} in {checkpointer.directory}")
                return 1
            bar.update(1)
            if step % config.train.log_every == 0 or step == steps:
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
                record = evaluate(eval_step, state, batches)
                writer.write(step, record)
                bar.write(console_line(step, steps, {"loss": loss, **record}))
            if step % config.checkpoint.every == 0 or step == steps or termination.requested:
                checkpointer.save(step, state, data.train.state(), wait=termination.requested)
            if termination.requested:
                log(f"SIGTERM: saved checkpoint at step {step} in {checkpointer.directory}; exiting")
                return 0
    finally:
        bar.close()
        writer.close()
        checkpointer.close()

    model = merge_model(graphdef, state)
    if config.log.sample_tokens > 0:
        text = generate(model, config.log.sample_prompt, max_new_tokens=config.log.sample_tokens, seed=seed)
        _write_atomically(run_dir / "samples.txt", text + "\n")
        log(f"sample ({run_dir / 'samples.txt'}):\n{text}")
    return 0
