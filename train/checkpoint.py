"""Orbax checkpoints of (train state, data iterator position), saved asynchronously and atomically,
verified when restored, and never trusted because they exist.

Orbax writes each step into a temporary folder and renames it when complete, so a run killed
mid-save leaves the previous checkpoint as the latest readable one. `latest_step` only ever
reports finished checkpoints. On top of that:

- **Manifest.** Once a save has finished, the lead process writes `<step>/hybrax_manifest.json`:
  the size of every file in the checkpoint. `restore_latest` checks it before reading, so a
  truncated or missing file is found in one line (a checkpoint without a manifest, e.g. killed
  between orbax's rename and the manifest, is still tried).
- **Fallback.** `restore_latest` tries the newest checkpoint first; one that cannot be restored (bad
  manifest, unreadable metadata, a read error) is reported in one warning line and the previous one
  is tried. The unreadable ones are moved, never deleted, to `<run dir>/unreadable_checkpoints/`
  (so the run can save those steps again). A checkpoint whose arrays do not fit the config is a
  config problem, not corruption: CheckpointMismatch, and nothing is moved.
- **Failed saves.** An asynchronous save that fails (disk full, permissions) is found by `poll`,
  which the loop calls every step, and raised as CheckpointSaveFailed in one line; a save is not
  started when the file system has less free space than the last checkpoint took (plus 10%).
  Either way the checkpoints already written are untouched.
"""

import collections
import json
import logging
import os
import pathlib
import shutil
import sys

import jax
import orbax.checkpoint as ocp

from hybrax.train.config import CheckpointConfig

MANIFEST = "hybrax_manifest.json"
SPACE_MARGIN = 1.1   # free space a save needs, relative to the size of the last checkpoint


class CheckpointMismatch(ValueError):
    """A checkpoint whose tree does not match the state the config builds."""


class CheckpointUnreadable(RuntimeError):
    """No checkpoint of the run directory can be restored."""


class CheckpointSaveFailed(RuntimeError):
    """A save that failed or could not start; the earlier checkpoints are intact."""


class Checkpointer:
    def __init__(self, run_dir: pathlib.Path, config: CheckpointConfig, *, log=print):
        _quiet_echoes_of_a_failure()
        options = ocp.CheckpointManagerOptions(max_to_keep=config.keep, create=True,
                                               enable_async_checkpointing=config.async_save)
        self.directory = (pathlib.Path(run_dir) / "checkpoints").absolute()
        self.unreadable = self.directory.parent / "unreadable_checkpoints"
        self.log, self.lead = log, jax.process_index() == 0
        self.pending: int | None = None   # a step whose save may still be running
        self.failed = False   # a save failed (and was reported)
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"),
                                             item_handlers=handlers)

    def latest_step(self) -> int | None:
        """The newest finished checkpoint on disk (a save still running or failed is not one)."""
        steps = [int(p.name) for p in self.directory.iterdir() if p.name.isdigit()] if self.directory.is_dir() else []
        return max(steps, default=None)

    def space_problem(self, state) -> str | None:
        """Why a save should not start now (too little free space), or None."""
        need = SPACE_MARGIN * (self._size(self.latest_step()) or sum(x.nbytes for x in jax.tree.leaves(state)))
        free = shutil.disk_usage(self.directory).free
        if free < need:
            return (f"only {free / 2**20:,.1f} MiB free on the file system of {self.directory}; a checkpoint "
                    f"needs about {need / 2**20:,.1f} MiB")
        return None

    def save(self, step: int, state, data_state: dict, *, wait: bool = False) -> None:
        """Starts saving `step` (waits for it when `wait`); CheckpointSaveFailed when an earlier save
        failed or this one does."""
        self.poll()
        try:
            self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                            data=ocp.args.JsonSave(data_state)), force=True)
        except Exception as e:   # a synchronous save writes here
            raise self._failed(step, e) from None
        self.pending = step
        if wait:
            self.finish()

    def poll(self) -> None:
        """Raises CheckpointSaveFailed if the pending save failed; writes its manifest once it is done."""
        if self.pending is None or self.manager.is_saving_in_progress():
            return
        self.finish()

    def finish(self) -> None:
        """Waits for the pending save; CheckpointSaveFailed if it failed, else writes its manifest."""
        if self.pending is None:
            return
        try:   # orbax keeps a failed save's error in its finalize thread and raises it here
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception as e:
            raise self._failed(self.pending, e) from None
        if self.lead and not (self.directory / str(self.pending)).is_dir():
            raise self._failed(self.pending, RuntimeError("orbax did not finalize it"))
        self._write_manifest(self.pending)
        self.pending = None

    def restore_latest(self, abstract_state) -> tuple[int, object, dict] | None:
        """(step, state, data iterator state) of the newest checkpoint that restores, or None when
        there is none. Unreadable newer ones are reported and moved aside (module docstring)."""
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)  # keeps given shardings
        failed = []
        self.manager.reload()
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state, data = self._restore(step, target)
            except CheckpointUnreadable as e:
                self.log(f"warning: {e}; trying the previous checkpoint")
                failed.append(step)
                continue
            self._move_aside(failed)
            return step, state, data
        if failed:
            raise CheckpointUnreadable(f"none of the checkpoints in {self.directory} (steps {sorted(failed)}) can "
                                       "be restored; pass --fresh to start over (they are moved aside, not deleted)")
        return None

    def restore(self, step: int, abstract_state):
        """(state shaped like `abstract_state`, data iterator state) of checkpoint `step`."""
        return self._restore(step, jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state))

    def _restore(self, step: int, target):
        where = self.directory / str(step)
        self._check_manifest(step)
        self._check_fits(step, target)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                          data=ocp.args.JsonRestore()))
        except Exception as e:
            raise CheckpointUnreadable(f"checkpoint {where} cannot be restored ({_first_line(e)})") from None
        if not isinstance(restored["data"], dict):
            raise CheckpointUnreadable(f"checkpoint {where} has no data iterator state")
        return restored["state"], restored["data"]

    def _check_manifest(self, step: int) -> None:
        folder = self.directory / str(step)
        path = folder / MANIFEST
        if not path.exists():
            return   # saved by an older hybrax, or killed before the manifest: orbax's reads decide
        try:
            sizes = json.loads(path.read_text())["files"]
        except (ValueError, KeyError, TypeError):
            raise CheckpointUnreadable(f"checkpoint {folder} has an unreadable {MANIFEST}") from None
        for name, size in sizes.items():
            file = folder / name
            if not file.is_file():
                raise CheckpointUnreadable(f"checkpoint {folder} lacks {name}")
            if file.stat().st_size != size:
                raise CheckpointUnreadable(f"checkpoint {folder}: {name} is {file.stat().st_size:,} bytes, it was "
                                           f"saved with {size:,}")

    def _check_fits(self, step: int, target) -> None:
        """Compare the stored array shapes with the target's before orbax starts reading."""
        where = self.directory / str(step)
        if not (where / "state" / "_METADATA").is_file():
            raise CheckpointUnreadable(f"checkpoint {where} lacks state/_METADATA")
        try:
            stored = self.manager.item_metadata(step)["state"]
        except Exception as e:
            raise CheckpointUnreadable(f"checkpoint {where} has unreadable metadata ({_first_line(e)})") from None
        stored_leaves = jax.tree.leaves(stored) if stored is not None else []
        if not all(hasattr(x, "shape") for x in stored_leaves) or not stored_leaves:
            raise CheckpointUnreadable(f"checkpoint {where} has no readable array metadata (state/_METADATA "
                                       "missing or damaged)")
        shape_of = lambda x: (tuple(x.shape), str(x.dtype))  # noqa: E731
        have = collections.Counter(shape_of(x) for x in stored_leaves)
        want = collections.Counter(shape_of(x) for x in jax.tree.leaves(target))
        if have != want:
            extra, missing = sorted(have - want), sorted(want - have)
            raise CheckpointMismatch(
                f"checkpoint {where} does not fit this config (model or optimizer changed since it was saved): it "
                f"stores {extra[:1] or 'no'} arrays (shape, dtype) that the config does not build, and lacks "
                f"{missing[:1] or 'none'}")

    def _write_manifest(self, step: int) -> None:
        folder = self.directory / str(step)
        if not self.lead or not folder.is_dir():
            return
        sizes = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
                 if p.is_file() and p.name != MANIFEST}
        tmp = folder / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps({"files": sizes}))
        os.replace(tmp, folder / MANIFEST)

    def _move_aside(self, steps: list[int]) -> None:
        if not steps:
            return
        if self.lead:
            self.unreadable.mkdir(exist_ok=True)
            for step in steps:
                target = self.unreadable / str(step)
                n = 1
                while target.exists():
                    target, n = self.unreadable / f"{step}.{n}", n + 1
                (self.directory / str(step)).rename(target)
                self.log(f"warning: moved unreadable checkpoint step {step} to {target}")
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("unreadable checkpoints moved")
        self.manager.reload()

    def _size(self, step: int | None) -> int:
        if step is None:
            return 0
        return sum(p.stat().st_size for p in (self.directory / str(step)).rglob("*") if p.is_file())

    def _failed(self, step: int | None, error: Exception) -> CheckpointSaveFailed:
        self.pending, self.failed = None, True
        return CheckpointSaveFailed(f"saving checkpoint step {step} failed ({_first_line(error)})")

    def close(self) -> None:
        """Waits for the last save and writes its manifest; a failure here is reported, not raised
        (the run's own outcome stands). Orbax raises a failed save's error again from every later
        wait, its own close included: once reported, that echo is dropped."""
        try:
            self.finish()
        except CheckpointSaveFailed as e:
            self.log(f"error: {e}")
        try:
            self.manager.close()
        except Exception as e:
            if not self.failed:
                self.log(f"error: closing the checkpoints in {self.directory} failed ({_first_line(e)})")


def _quiet_echoes_of_a_failure() -> None:
    """One failed read or write inside orbax echoes many times: orbax logs the error of its writer
    thread (and raises the same error to `poll`, which reports it in one line), every sibling read
    still in flight fails into sys.unraisablehook or asyncio's "exception was never retrieved" log,
    and every callback into the closed event loop raises 'Event loop is closed' (160 lines for one
    truncated file). Those echoes, recognized by orbax frames in their traceback, are dropped;
    everything else passes through. Idempotent."""
    if getattr(sys.unraisablehook, "hybrax_quiet", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        error = unraisable.exc_value
        if not (_from_orbax(error) or str(error) == "Event loop is closed"):
            previous(unraisable)

    hook.hybrax_quiet = True
    sys.unraisablehook = hook
    logging.getLogger("absl").addFilter(_not_an_orbax_echo)
    logging.getLogger("asyncio").addFilter(_not_an_orbax_echo)


def _not_an_orbax_echo(record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR:
        return True
    error = record.exc_info[1] if record.exc_info else None
    never_retrieved = "exception was never retrieved" in record.getMessage() and "TensorStore" in record.getMessage()
    return not ("orbax" in record.pathname or never_retrieved or _from_orbax(error))


def _from_orbax(error: BaseException | None) -> bool:
    """Whether `error`, or an error it came from, passed through orbax or tensorstore."""
    while error is not None:
        tb = error.__traceback__
        while tb is not None:
            if "orbax" in tb.tb_frame.f_code.co_filename or "tensorstore" in tb.tb_frame.f_code.co_filename:
                return True
            tb = tb.tb_next
        error = error.__cause__ or error.__context__
    return False


def _first_line(error: Exception) -> str:
    """The first line of the error this one came from (orbax wraps tensorstore's own message)."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = str(error).strip().splitlines()
    return (lines[0] if lines else type(error).__name__)[:300]
