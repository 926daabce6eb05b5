"""The Checkpointer's failure paths, in process (the fault suite, tests/train/test_faults.py, drives
the same ones through the command line on a full disk, where which write fails is a race)."""

import errno

import jax.numpy as jnp
import pytest

from hybrax.train.checkpoint import Checkpointer, CheckpointSaveFailed
from hybrax.train.config import CheckpointConfig

STATE = {"w": jnp.arange(6.0).reshape(2, 3)}


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_save_is_one_error_and_its_echo_at_close_is_dropped(tmp_path):
    """A save fails in orbax's finalize thread: finish reports it. Orbax can raise the same failure
    again from a later wait (a failed metadata write, say, is only collected once another error has
    been raised), its close included: close() neither raises nor repeats it. The checkpoint saved
    before keeps its manifest and the failed one gets none."""
    lines = []
    checkpointer = Checkpointer(tmp_path, CheckpointConfig(async_save=True), log=lines.append)
    checkpointer.save(1, STATE, {"position": 1}, wait=True)
    checkpointer.manager._finalize = _disk_full   # what the finalize thread of the next save runs
    checkpointer.save(2, STATE, {"position": 2})
    with pytest.raises(CheckpointSaveFailed, match=r"^saving checkpoint step 2 failed \(\[Errno 28\] No space"):
        checkpointer.finish()
    close = checkpointer.manager.close
    checkpointer.manager.close = lambda: (close(), _disk_full())
    checkpointer.close()
    assert lines == []
    assert (tmp_path / "checkpoints/1/hybrax_manifest.json").is_file()
    assert not (tmp_path / "checkpoints/2/hybrax_manifest.json").exists()


def test_a_close_that_fails_with_nothing_reported_says_so_in_one_line(tmp_path):
    lines = []
    checkpointer = Checkpointer(tmp_path, CheckpointConfig(async_save=True), log=lines.append)
    checkpointer.save(1, STATE, {"position": 1}, wait=True)
    checkpointer.manager.wait_until_finished = _disk_full
    checkpointer.close()
    assert lines == [f"error: closing the checkpoints in {tmp_path / 'checkpoints'} failed ([Errno 28] No space "
                     "left on device)"]
