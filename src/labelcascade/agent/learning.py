"""Learning from the LLM: its confident answers become `llm` examples, and the fallback is retrained from them.

Every `retrain_every` new LLM examples the fallback is retrained on everything stored, with sample weights by
source and confidence (fallback/weights.py), saved beside the old model and swapped in. Gold and review examples
are safe from the LLM twice over: the store never lets an LLM label replace a person's label of the same text,
and a person's example weighs at least twice as much as any LLM example.

A retrain has three steps so that its slow middle can leave the thread that answers (the HTTP service does that):
`Learner.begin` reads the store (on the session's thread), `Retraining.fit` trains on that snapshot and touches
nothing shared (any thread; scikit-learn's solver runs without the GIL), and `Learner.accept` saves the new model
(on the session's thread again). Until `accept`, the old model answers; a retrain killed before it leaves the old
model and its pending count, so the next one starts over from the store.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from sklearn.model_selection import StratifiedKFold

from labelcascade.fallback import LinearSVMClassifier, sample_weights
from labelcascade.records import Source
from labelcascade.retrieval import ExampleStore


@dataclass
class Retraining:
    """One retrain's snapshot of the store, and the model `fit` trains on it."""

    vectors: np.ndarray
    y: list
    weights: np.ndarray
    multi_label: bool
    C: float
    pending: int  # LLM examples not yet trained on when the snapshot was taken
    texts: list[str] = field(default_factory=list, repr=False)
    text_features: float | str = 0.0
    min_temperature: float = 0.0
    confidences: np.ndarray | None = field(default=None, repr=False)  # each label's, as stored (1 for a person's)
    model: LinearSVMClassifier | None = field(default=None, repr=False)
    sources: list[Source] = field(default_factory=list, repr=False)

    def fit(self) -> Retraining:
        """Train the model; safe on any thread (it reads only this snapshot)."""
        self.model = self._fitted(np.arange(len(self.y)))
        return self

    def _fitted(self, rows: np.ndarray) -> LinearSVMClassifier:
        model = LinearSVMClassifier(self.C, multi_label=self.multi_label, text_features=self.text_features,
                                    min_temperature=self.min_temperature)
        texts = [self.texts[i] for i in rows] if self.texts else self.texts
        return model.fit(self.vectors[rows], [self.y[i] for i in rows], sample_weight=self.weights[rows], texts=texts)

    def held_out_probabilities(self, rows: np.ndarray, labels: Sequence[str], folds: int) -> np.ndarray:
        """Single-label: for each of `rows` (positions in this snapshot), the probabilities over `labels` of a
        model trained as `fit` trains it on everything but that row's fold (`rows` split in `folds` stratified
        folds; the other examples train every fold's model): what the fallback says of a text it was not trained
        on, for calibrating on the training texts themselves. Each label needs `folds` rows at least."""
        rows = np.asarray(rows)
        position = {name: i for i, name in enumerate(labels)}
        proba = np.zeros((len(rows), len(labels)))
        split = StratifiedKFold(n_splits=folds, shuffle=True, random_state=0)
        for _, left in split.split(rows, [self.y[i] for i in rows]):
            model = self._fitted(np.setdiff1d(np.arange(len(self.y)), rows[left]))
            texts = [self.texts[i] for i in rows[left]] if self.texts else None
            columns = [position[str(label)] for label in model.classes_]
            proba[np.ix_(left, columns)] = model.predict_proba(self.vectors[rows[left]], texts)
        return proba

    def abandon(self) -> None:
        """Give this retrain up without `end_retrain`; a head-only one holds nothing (a body retrain holds the
        workspace's body lock: `session.BodyRetraining`)."""


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
        text_features: float | str = 0.0,
        min_temperature: float = 0.0,
    ):
        """`save` makes a trained model durable; `trained_at` (epoch seconds) is when the current model was
        trained, so LLM examples stored after it count as pending after a restart. `C`, `text_features` and
        `min_temperature`: the fallback's (`LinearSVMClassifier`)."""
        self.store = store
        self.multi_label = multi_label
        self.C = C
        self.text_features = text_features
        self.min_temperature = min_temperature
        self._save = save
        self.pending = store.count(Source.LLM, since=trained_at) if trained_at is not None else store.count(Source.LLM)

        # False: `learn` only stores, and whoever owns the session retrains when `due` says so (off its thread).
        self.auto = True

    def train(self) -> LinearSVMClassifier:
        """A fallback trained on every stored example (weighted by source), saved and returned."""
        return self.accept(self.begin().fit())

    def begin(self) -> Retraining:
        """A snapshot of every stored example (weighted by source), to `fit` on any thread."""
        vectors, labels, sources, confidences, texts = self.store.training_data()
        y = labels if self.multi_label else [row[0] for row in labels]
        return Retraining(vectors, y, sample_weights(sources, confidences), self.multi_label, self.C, self.pending,
                          texts, self.text_features, self.min_temperature, confidences, sources=list(sources))

    def accept(self, retraining: Retraining) -> LinearSVMClassifier:
        """Make a fitted retraining's model durable and return it; LLM examples stored since its snapshot stay
        pending."""
        if retraining.model is None:
            raise RuntimeError("this retraining has not been fitted; call its fit() first")
        self.store.save()
        self._save(retraining.model)
        self.pending = max(0, self.pending - retraining.pending)
        return retraining.model

    def due(self, retrain_every: int) -> bool:
        """Whether enough LLM examples have come since the last retrain."""
        return self.pending >= retrain_every

    def learn(
        self,
        texts: Sequence[str],
        labels: Sequence[Sequence[str]],
        confidences: Sequence[float],
        vectors: np.ndarray,
        *,
        retrain_every: int,
    ) -> LinearSVMClassifier | None:
        """Store LLM answers; returns a retrained fallback once `retrain_every` new ones have accumulated (unless
        `auto` is off: then it only stores)."""
        before = len(self.store)
        self.store.add(texts, labels, vectors, source=Source.LLM, confidence=confidences)  # durable on return
        self.pending += len(self.store) - before  # texts already stored (by anyone) are not new examples
        return self.train() if self.auto and self.due(retrain_every) else None
