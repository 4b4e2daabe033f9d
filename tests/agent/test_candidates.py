"""Narrowing the candidates by the fallback's probabilities and the neighbours' labels."""

import numpy as np

from labelcascade.agent.candidates import plausibility, top_candidates
from labelcascade.records import Example, Neighbor

LABELS = ["a", "b", "c", "d"]


def neighbor(label: str, score: float) -> Neighbor:
    return Neighbor(Example(id=0, text=f"text {label}", labels=(label,)), score)


def test_plausibility_halves_fallback_and_neighbour_votes():
    fallback = np.array([0.6, 0.2, 0.1, 0.1])
    neighbors = [neighbor("c", 0.9), neighbor("c", 0.6), neighbor("b", 0.5)]
    np.testing.assert_allclose(plausibility(fallback, neighbors, LABELS), [0.3, 0.1 + 0.125, 0.05 + 0.375, 0.05])


def test_top_candidates_keeps_labels_the_neighbours_vouch_for():
    fallback = np.array([0.5, 0.3, 0.15, 0.05])
    assert top_candidates(fallback, [], LABELS, 2) == [0, 1]
    assert top_candidates(fallback, [neighbor("d", 0.8)] * 3, LABELS, 2) == [3, 0]
    assert top_candidates(fallback, [], LABELS, 10) == [0, 1, 2, 3]
