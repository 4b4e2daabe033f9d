"""How much each training example counts when the fallback is (re)trained.

People's labels count more than the LLM's, and a correction counts most: a gold example weighs 1, a review 2,
an LLM label its confidence times 0.5. So a handful of unsure LLM labels cannot outvote the gold set.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from labelcascade.records import Source

SOURCE_WEIGHTS = {Source.GOLD: 1.0, Source.REVIEW: 2.0, Source.LLM: 0.5}


def sample_weights(sources: Sequence[Source | str], confidences: Sequence[float]) -> np.ndarray:
    """One weight per example: the source's weight, scaled by confidence for LLM labels."""
    if len(sources) != len(confidences):
        raise ValueError(f"{len(sources)} sources but {len(confidences)} confidences")
    weights = np.empty(len(sources))
    for i, (source, confidence) in enumerate(zip(sources, confidences, strict=True)):
        source = Source(source)
        weights[i] = SOURCE_WEIGHTS[source] * (confidence if source is Source.LLM else 1.0)
    return weights
