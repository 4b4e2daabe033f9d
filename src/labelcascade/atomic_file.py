"""Replace a file in one rename: a reader, or a process killed mid-write, sees the old file or the new one, never half.

A leaf module, like file_hash.py, so the store, the calibration, the workspace, jobs and reports share one way of
doing it. Callers turn an OSError into their own message (which file, what to do): this module only guarantees
that nothing half-written is left behind.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def replace_atomically(path: Path, write: Callable[[Path], None]) -> os.stat_result:
    """Call `write(temporary)` on a fresh file beside `path`, flush it to disk, and rename it onto `path`; return
    the file's status as written (its inode, size and modification time stay the same through the rename, so a
    caller can later tell its own file from one another process put there since).

    The temporary name is unique (two processes may write into one folder) and hidden; it is removed if `write`
    fails or the process is interrupted, so a failure leaves `path` as it was.
    """
    path = Path(path)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    temporary = Path(name)
    try:
        write(temporary)
        with temporary.open("rb") as file:
            os.fsync(file.fileno())
            written = os.fstat(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return written


def write_text_atomically(path: Path, text: str) -> os.stat_result:
    """`text` as UTF-8 into `path`, in one rename (what `replace_atomically` returns)."""
    return replace_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def write_bytes_atomically(path: Path, content: bytes) -> os.stat_result:
    """`content` into `path`, in one rename (what `replace_atomically` returns)."""
    return replace_atomically(path, lambda temporary: temporary.write_bytes(content))
