"""SIGTERM, honoured from the moment the trainer starts: the signal is remembered, and acted on
where it is safe. Before the first step (setup, restore, compile) the run exits 0 with nothing new
to save; inside the loop it saves at the end of the current step and exits 0.

`listen()` is called first thing by `hybrax-train` and again by the loop (for callers of
`train()` from Python); it is idempotent and only installs from the main thread.

`follow_parent()`: a trainer started by `hybrax-sweep` (which sets HYBRAX_PARENT_PID) gets SIGTERM
from the kernel when the sweep dies, however it dies (SIGKILL included), so it saves and exits
instead of writing on, orphaned, into a directory the sweep's rerun resumes.
"""

import ctypes
import os
import signal
import sys
import threading

PARENT_ENV = "HYBRAX_PARENT_PID"
_PR_SET_PDEATHSIG = 1
_requested = threading.Event()


def listen() -> None:
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is not _handle:
        signal.signal(signal.SIGTERM, _handle)


def requested() -> bool:
    return _requested.is_set()


def follow_parent() -> None:
    """SIGTERM when the process named by HYBRAX_PARENT_PID exits (Linux; a no-op elsewhere or unset)."""
    parent = os.environ.get(PARENT_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != int(parent):   # the parent died before the hook was set
        os.kill(os.getpid(), signal.SIGTERM)


def _handle(signum, frame) -> None:
    _requested.set()
