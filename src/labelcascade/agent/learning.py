"""Learning from the LLM: its confident answers become `llm` examples, and the fallback is retrained from them.

Every `retrain_every` new LLM examples the fallback is retrained on everything stored, with sample weights by
source and confidence (fallback/weights.py), saved beside the old model and swapped in. Gold and review examples
are safe from the LLM twice over: the store never lets an LLM label replace a person's label of the same text,
and a person's example weighs at least twice as much as any LLM example.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from labelcascade.fallback import LinearSVMClassifier, sample_weights
from labelcascade.records import Source
from labelcascade.retrieval import ExampleStore


class Learner:
    """Trains the fallback on the store and counts the LLM examples it has not seen yet."""

    def __init__(
        self,
        store: ExampleStore,
        *,
        multi_label: bool,
        C: float,
        save: Callable[[LinearSVMClassifier], None],
        trained_at: float | None = None,
    ):
        """`save` makes a trained model durable; `trained_at` (epoch seconds) is when the current model was
        trained, so LLM examples stored after it count as pending after a restart."""
        self.store = store
        self.multi_label = multi_label
        self.C = C
        self._save = save
        self.pending = store.count(Source.LLM, since=trained_at) if trained_at is not None else store.count(Source.LLM)

    def train(self) -> LinearSVMClassifier:
        """A fallback trained on every stored example (weighted by source), saved and returned."""
        vectors, labels, sources, confidences = self.store.training_data()
        y = labels if self.multi_label else [row[0] for row in labels]
        model = LinearSVMClassifier(self.C, multi_label=self.multi_label)
        model.fit(vectors, y, sample_weight=sample_weights(sources, confidences))
        self.store.save()
        self._save(model)
        self.pending = 0
        return model

    def learn(
        self,
        texts: Sequence[str],
        labels: Sequence[Sequence[str]],
        confidences: Sequence[float],
        vectors: np.ndarray,
        *,
        retrain_every: int,
    ) -> LinearSVMClassifier | None:
        """Store LLM answers; returns a retrained fallback once `retrain_every` new ones have accumulated."""
        before = len(self.store)
        self.store.add(texts, labels, vectors, source=Source.LLM, confidence=confidences)  # durable on return
        self.pending += len(self.store) - before  # texts already stored (by anyone) are not new examples
        return self.train() if self.pending >= retrain_every else None
