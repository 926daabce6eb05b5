"""One trainer per run directory: an exclusive lock (`<run dir>/.lock`, flock) held for the run.

A second trainer on the same directory fails at once with one line naming the holder's pid and
host. The operating system releases the lock when its holder exits, however it exits (SIGKILL
included), so a rerun after a crash finds the directory free. In a multi-process run only process
0 takes it.
"""

import contextlib
import fcntl
import os
import pathlib
import socket


class RunDirectoryInUse(RuntimeError):
    """Another live trainer holds the run directory."""


@contextlib.contextmanager
def run_directory_lock(run_dir: pathlib.Path):
    handle = open(run_dir / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunDirectoryInUse(f"run directory {str(run_dir)!r} is in use by {holder}; wait for it to finish "
                                "or pass another --run-dir") from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on host {socket.gethostname()}")
        handle.flush()
        yield
    finally:
        handle.truncate(0)
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
