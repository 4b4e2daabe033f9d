"""SIGTERM unwinds the program as Ctrl-C does, so that what it holds is closed before it ends.

SIGTERM is what `kill`, service managers and container runtimes send to stop a process. Python's default handler
ends the process at once, so no `finally` clause or `with` block runs: a session stopped that way had not saved its
FAISS index (the next open rebuilt it from SQLite, with a warning) nor closed its engine and embedder processes.
Inside `sigterm_unwinds()` a SIGTERM raises `Terminated` instead, which unwinds through every `finally`; at the end
of the block the signal is raised again with the handler that was there before, so that the process still ends as
killed by SIGTERM (the exit status service managers count as a clean stop).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Terminated(BaseException):
    """SIGTERM arrived: a BaseException, as KeyboardInterrupt is, so that `except Exception` does not swallow it."""


@contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """Within the block, SIGTERM raises `Terminated`; after the block has unwound, SIGTERM is raised again with the
    previous handler (Python's default: the process ends). Signals are the main thread's: elsewhere nothing changes.
    Nested blocks compose: the inner one hands the signal on to the outer one's handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    terminated = False
    try:
        yield
    except Terminated:
        terminated = True
    finally:
        signal.signal(signal.SIGTERM, previous)
    if terminated:
        signal.raise_signal(signal.SIGTERM)
