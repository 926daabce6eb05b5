"""SIGTERM, honoured from the moment the trainer starts: the signal is remembered, and acted on
where it is safe. Before the first step (setup, restore, compile) the run exits 0 with nothing new
to save; inside the loop it saves at the end of the current step and exits 0.

`listen()` is called first thing by `hybrax-train` and again by the loop (for callers of
`train()` from Python); it is idempotent and only installs from the main thread.
"""

import signal
import threading

_requested = threading.Event()


def listen() -> None:
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is not _handle:
        signal.signal(signal.SIGTERM, _handle)


def requested() -> bool:
    return _requested.is_set()


def _handle(signum, frame) -> None:
    _requested.set()
