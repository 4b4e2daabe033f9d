"""Embedding texts and keeping the labelled examples (FAISS index + SQLite metadata) for few-shot retrieval."""

from labelcascade.retrieval.embedders import Embedder, SentenceTransformerEmbedder, load_embedder
from labelcascade.retrieval.store import EmbedderMismatchError, ExampleStore, StoreError

__all__ = ["Embedder", "EmbedderMismatchError", "ExampleStore", "SentenceTransformerEmbedder", "StoreError", "load_embedder"]
