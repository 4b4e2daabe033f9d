"""Where labelcascade keeps the model files it makes or installs on a machine, outside any workspace: the packaged
LLMs joined from their wheels, and the onnxruntime graph of the packaged embedder. One folder per user, shared by
all workspaces, because these files depend on the installed packages alone.

A leaf module, like file_hash.py, so the engines and the embedders share it without importing each other.
"""

from __future__ import annotations

import os
from pathlib import Path


def models_folder() -> Path:
    """$LABELCASCADE_MODELS, or labelcascade/models in the user's cache folder ($XDG_CACHE_HOME or ~/.cache)."""
    if os.environ.get("LABELCASCADE_MODELS"):
        return Path(os.environ["LABELCASCADE_MODELS"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "labelcascade" / "models"
