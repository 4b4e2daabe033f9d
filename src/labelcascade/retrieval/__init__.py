"""Embedding texts and keeping the labelled examples (FAISS index + SQLite metadata) for few-shot retrieval."""

from labelcascade.retrieval.embedders import Embedder, SentenceTransformerEmbedder, load_embedder
from labelcascade.retrieval.store import EmbedderMismatchError, ExampleStore

__all__ = ["Embedder", "EmbedderMismatchError", "ExampleStore", "SentenceTransformerEmbedder", "load_embedder"]
