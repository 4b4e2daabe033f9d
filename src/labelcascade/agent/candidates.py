"""Narrowing a large label set to the few labels worth asking the LLM about.

Scoring 77 labels costs the LLM ~77 continuations per text, and a small model is easily distracted by many
options. The fallback and the retrieved neighbours already know which labels are plausible: each label gets the
mean of its fallback probability and its share of the neighbours' similarity, and the best `m` go to the LLM.
`calibrate` picks the smallest `m` that keeps the true label among the candidates for 98% of dev texts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from labelcascade.records import Neighbor


def plausibility(fallback: np.ndarray, neighbors: Sequence[Neighbor], labels: Sequence[str]) -> np.ndarray:
    """Per label (task order): half its fallback probability, half its share of the neighbours' similarity."""
    votes = np.zeros(len(labels))
    position = {label: i for i, label in enumerate(labels)}
    for neighbor in neighbors:
        for label in neighbor.example.labels:
            if label in position:
                votes[position[label]] += max(neighbor.score, 0.0)
    if votes.sum() > 0:
        votes /= votes.sum()
    return 0.5 * fallback + 0.5 * votes


def top_candidates(fallback: np.ndarray, neighbors: Sequence[Neighbor], labels: Sequence[str], m: int) -> list[int]:
    """Indices (into `labels`) of the `m` most plausible labels, most plausible first."""
    order = np.argsort(-plausibility(fallback, neighbors, labels), kind="stable")
    return order[: min(m, len(labels))].tolist()


def smallest_m_for_recall(ranks: Sequence[int], n_labels: int, recall: float = 0.98, minimum: int = 2) -> int:
    """The smallest candidate count that keeps the true label for `recall` of texts, given each text's true-label
    rank (0 = most plausible) under `plausibility`."""
    if not len(ranks):
        return min(max(minimum, 2), n_labels)
    needed = int(np.ceil(np.quantile(np.asarray(ranks), recall, method="inverted_cdf"))) + 1
    return int(min(max(needed, minimum), n_labels))
