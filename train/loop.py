"""The training loop: build the run (train.run), then step, log, evaluate and checkpoint to the last
step, and sample from the final model.

Everything runs under the mesh of the `mesh` config (`jax.set_mesh`): the state is created (or
restored, onto whatever mesh shape this run has) already sharded, batches are placed in zigzag
order (train.sharding), and the step keeps the state's layout. In a multi-process run
(`jax.distributed`, train.distributed) every process runs this same loop; only process 0 writes
the log, metrics, config and samples, and all of them write the checkpoint together.

Exit codes: 0 when the run finishes or stops on SIGTERM (after saving a checkpoint); 1 when the
loss or the gradient norm stops being finite, or the state is not finite when a save is due
(nothing is saved, so the last good checkpoint, checked finite when written, stays the latest), or
when a checkpoint cannot be saved (an asynchronous save that failed, found at the next step, or too
little free space to start one). Each stop is one line naming the last good checkpoint.

A stop every process must take together is agreed first (train.distributed.any_process): a
SIGTERM that reached one host, or a full disk seen by one, stops them all at the same step, so
the collective save is entered by all processes or by none. In a multi-process run SIGTERM goes to
JAX's preemption service, whose sync point (train.distributed.preemption_reached) is that agreement.
"""

import pathlib
import time

from jax.experimental import multihost_utils
from tqdm import tqdm

from hybrax.train import termination
from hybrax.train.checkpoint import CheckpointSaveFailed
from hybrax.train.config import Config
from hybrax.train.data import validation_batches
from hybrax.train.distributed import any_process, preemption_reached
from hybrax.train.metrics import console_line, is_finite, plain
from hybrax.train.run import Run, build_run, write_atomically
from hybrax.train.run_directory import OnChange
from hybrax.train.sample import generate
from hybrax.train.sharding import shard_batch, to_host
from hybrax.train.step import TrainState, merge_model, state_is_finite, summarize_eval


def train(config: Config, run_dir: str | pathlib.Path, *, on_change: OnChange = OnChange.REFUSE, log=print) -> int:
    """Trains, or resumes, the run in `run_dir`; returns the exit code (see the module docstring).
    `on_change`: what to do when `run_dir` was started with another config (train.run_directory)."""
    with build_run(config, pathlib.Path(run_dir), on_change=on_change, log=log) as run:
        code, state = _loop(run)
    if code == 0 and state is not None and config.log.sample_tokens > 0:
        _sample(run, state)
    return code


def _loop(run: Run) -> tuple[int, TrainState | None]:
    """(exit code, final state or None when stopped early)."""
    termination.listen()
    if any_process(termination.requested())[0]:   # during setup or compile: nothing new to save
        run.log(f"SIGTERM before the first step: nothing new to save (latest checkpoint: step "
                f"{run.checkpointer.latest_step()}); exiting")
        return 0, None
    bar = tqdm(total=run.config.train.steps, initial=run.start, dynamic_ncols=True, mininterval=1.0,
               disable=not (run.lead and run.config.log.progress_bar))
    try:
        return _steps(run, bar)
    except MetricsUnwritable as e:   # a full disk, a lost mount
        return _stop(run, str(e)), None
    finally:
        bar.close()


def _steps(run: Run, bar: tqdm) -> tuple[int, TrainState | None]:
    config, steps = run.config, run.config.train.steps
    B, T = config.data.batch_size, config.data.seq_len
    state, window = run.state, _Throughput()
    for step in range(run.start + 1, steps + 1):
        batch = shard_batch(next(run.data.train), run.mesh, batch_size=B, row_start=run.rows[0])
        t = time.perf_counter()
        state, metrics = run.train_step(state, batch)
        metrics = to_host(metrics)
        loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
        window.add(B * T, time.perf_counter() - t)
        if not (is_finite(loss) and is_finite(grad_norm)):   # a NaN gradient poisons the update
            what = f"loss is {loss}" if not is_finite(loss) else f"grad_norm is {grad_norm} (loss {loss:.4f})"
            return _stop(run, f"{what} at step {step}"), None
        bar.update(1)
        last = step == steps
        if run.lead and (step % config.train.log_every == 0 or last):
            _report(run, bar, step, _train_record(run, metrics, window.take_rate()))
        if step % config.train.eval_every == 0 or last:   # every process: the eval step is collective
            batches = validation_batches(run.data, config.data, config.train.eval_batches)
            record = evaluate(run.eval_step, state, batches, run.mesh)
            if run.lead:
                _report(run, bar, step, record, shown={"loss": loss, **record})
        failed = _save_failure(run.checkpointer.poll)   # an earlier asynchronous save that failed
        stopping, failed_somewhere = any_process(termination.requested(), failed is not None)  # all, or none
        stopping = preemption_reached(step) or stopping   # SIGTERM when jax.distributed's notifier holds it
        if not failed_somewhere and (step % config.checkpoint.every == 0 or last or stopping):
            if not bool(state_is_finite(state)):
                return _stop(run, f"the state holds a non-finite value after step {step}"), None
            problem = run.checkpointer.space_problem(state)
            if any_process(problem is not None)[0]:
                problem = problem or "another process has too little free space"
                return _stop(run, f"cannot save checkpoint step {step}: {problem}"), None
            failed = _save_failure(run.checkpointer.save, step, state, run.data.train.state(), wait=stopping or last)
            failed_somewhere = any_process(failed is not None)[0]
        if failed_somewhere:
            failed = failed or "a checkpoint save failed on another process"
            return _stop(run, f"{failed}, found after step {step}"), None
        if stopping:
            run.log(f"SIGTERM: saved checkpoint at step {step} in {run.checkpointer.directory}; exiting")
            return 0, None
    return 0, state


class MetricsUnwritable(RuntimeError):
    """metrics.jsonl (or TensorBoard) could not be written."""


def _save_failure(call, *args, **kwargs) -> CheckpointSaveFailed | None:
    try:
        call(*args, **kwargs)
    except CheckpointSaveFailed as e:
        return e
    return None


def _stop(run: Run, what: str) -> int:
    """Exit code 1 with one line naming the last good checkpoint (every saved one was checked finite;
    a save still running is waited for first)."""
    try:
        run.checkpointer.finish()
    except CheckpointSaveFailed as e:
        what = f"{what}; {e}"
    latest = run.checkpointer.latest_step()
    good = (f"the last good checkpoint is step {latest} in {run.checkpointer.directory}" if latest is not None
            else "there is no checkpoint yet")
    run.log(f"error: {what}; stopped without saving, {good}")
    return 1


def evaluate(eval_step, state, batches, mesh) -> dict:
    sums = {"nll": 0.0, "tokens": 0.0, "byte_nll": 0.0, "bytes": 0.0}
    for batch in batches:
        out = to_host(eval_step(state.params, state.model_state, shard_batch(batch, mesh)))
        for key in sums:
            sums[key] += float(out[key])
    return summarize_eval(sums)


class _Throughput:
    """Tokens and step seconds since the last logged step."""

    def __init__(self):
        self.tokens, self.seconds = 0, 0.0

    def add(self, tokens: int, seconds: float) -> None:
        self.tokens += tokens
        self.seconds += seconds

    def take_rate(self) -> float:
        """Tokens per second over the window, which starts again."""
        rate = self.tokens / self.seconds
        self.tokens, self.seconds = 0, 0.0
        return rate


def _train_record(run: Run, metrics: dict, tokens_per_s: float) -> dict:
    flops_per_s = tokens_per_s * run.train_flops_per_token
    return {"loss": float(metrics["loss"]), "lr": float(metrics["lr"]), "grad_norm": float(metrics["grad_norm"]),
            "tokens_per_s": tokens_per_s, "tflops": flops_per_s / 1e12, "mfu": flops_per_s / run.peak_flops,
            **{k: plain(v) for k, v in metrics.items() if k.startswith("aux")}}


def _report(run: Run, bar: tqdm, step: int, record: dict, *, shown: dict | None = None) -> None:
    """`record` into the metrics; its console line (or `shown`'s) above the progress bar."""
    try:
        run.writer.write(step, record)
    except OSError as e:
        raise MetricsUnwritable(f"cannot write {run.writer.path} ({e.strerror or e}) after step {step}") from None
    bar.write(console_line(step, run.config.train.steps, shown or record))


def _sample(run: Run, state: TrainState) -> None:
    """A sample from process 0, on one device, from a full host copy of the (sharded) state."""
    params = multihost_utils.process_allgather(state.params, tiled=True)
    model_state = multihost_utils.process_allgather(state.model_state, tiled=True)
    if not run.lead:
        return
    model = merge_model(run.graphdef, state.replace(params=params, model_state=model_state))
    log = run.config.log
    text = generate(model, log.sample_prompt, max_new_tokens=log.sample_tokens, seed=run.config.train.seed,
                    tokenizer=run.data.tokenizer)
    write_atomically(run.run_dir / "samples.txt", text + "\n")
    run.log(f"sample ({run.run_dir / 'samples.txt'}):\n{text}")
