"""The cascade: one embedding per text, the fallback first, the LLM only when the fallback is unsure.

This is where the classification policy of DESIGN.md ("One classification") lives. The LLM side (retrieval of
few-shot examples, engine scoring, abstaining, degrading, learning) joins here as engines are added; with no
engine configured every answer comes from the fallback, marked with route `fallback`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from labelcascade.fallback import LinearSVMClassifier
from labelcascade.records import Prediction, Route
from labelcascade.retrieval import Embedder
from labelcascade.task import Task


class Cascade:
    """Answers texts for one task from an embedder and a fitted fallback classifier."""

    def __init__(self, task: Task, embedder: Embedder, fallback: LinearSVMClassifier):
        self.task = task
        self.embedder = embedder
        self.fallback = fallback
        # Columns of the fallback's probabilities, placed among all of the task's labels (a label with no
        # examples yet gets probability 0), so callers always see the same label order.
        self._labels = task.label_names
        self._columns = np.array([self._labels.index(label) for label in fallback.classes_])

    def probabilities(self, vectors: np.ndarray) -> np.ndarray:
        """Probabilities (n, n_task_labels) in task label order, from the fallback."""
        proba = np.zeros((len(vectors), len(self._labels)))
        proba[:, self._columns] = self.fallback.predict_proba(vectors)
        return proba

    def classify(self, texts: Sequence[str]) -> list[Prediction]:
        """One prediction per text; the texts are embedded together in batches."""
        start = time.perf_counter()
        proba = self.probabilities(self.embedder.embed(texts))
        latency_ms = (time.perf_counter() - start) * 1000 / max(len(texts), 1)
        return [self._prediction(row, latency_ms) for row in proba]

    def _prediction(self, proba: np.ndarray, latency_ms: float) -> Prediction:
        probabilities = dict(zip(self._labels, proba.tolist(), strict=True))
        if self.task.multi_label:
            chosen = [i for i in np.argsort(-proba) if proba[i] >= 0.5]
            labels = [self._labels[i] for i in chosen]
            # The answer's probability is that of its least sure label; an empty answer's is that no label applies.
            confidence = float(proba[chosen].min()) if chosen else float(1.0 - proba.max())
        else:
            best = int(proba.argmax())
            labels, confidence = [self._labels[best]], float(proba[best])
        return Prediction(
            label=labels[0] if labels else None,
            labels=labels,
            confidence=confidence,
            probabilities=probabilities,
            route=Route.FALLBACK,
            latency_ms=latency_ms,
        )
