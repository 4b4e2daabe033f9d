"""The records that travel between layers: labelled examples, retrieved neighbours and predictions.

They live in one leaf module so that every layer (prompts, retrieval, fallback, agent, front doors) can share
them without importing each other.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

from pydantic import BaseModel, ConfigDict, Field


class Source(str, Enum):
    """Where a label came from; the order of trust is review > gold > llm."""

    GOLD = "gold"  # labelled by people
    LLM = "llm"  # labelled by the LLM
    REVIEW = "review"  # a person's correction of an earlier answer

    @property
    def rank(self) -> int:
        """Higher outranks lower when two sources disagree about the same text."""
        return {Source.LLM: 0, Source.GOLD: 1, Source.REVIEW: 2}[self]


class Route(str, Enum):
    """Which part of the cascade produced an answer."""

    FALLBACK = "fallback"  # the embedding + SVM classifier was sure enough
    LLM = "llm"  # the LLM answered
    DEGRADED = "degraded"  # the LLM failed or timed out; the fallback answered instead
    ABSTAIN = "abstain"  # nobody was sure enough and the task allows "none of these"


@dataclass(frozen=True)
class Example:
    """A labelled text as the example store keeps it."""

    id: int
    text: str
    labels: tuple[str, ...]
    source: Source = Source.GOLD
    confidence: float = 1.0
    created_at: float = field(default_factory=time.time)

    @property
    def label(self) -> str:
        """The first (for single-label tasks: the only) label."""
        return self.labels[0]


@dataclass(frozen=True)
class Neighbor:
    """A stored example returned by a similarity search, with its cosine similarity to the query."""

    example: Example
    score: float


class Prediction(BaseModel):
    """What every front door returns for one text."""

    model_config = ConfigDict(frozen=True)

    label: str | None = Field(description="The answer; None when the cascade abstained or a multi-label answer is empty.")
    labels: list[str] = Field(description="All labels answered (one for single-label tasks, any number for multi-label).")
    confidence: float = Field(description="Probability of the answer (for multi-label: of the least sure label answered).")
    probabilities: dict[str, float] = Field(description="Probability of each candidate label.")
    route: Route
    evidence: list[int] = Field(default_factory=list, description="Ids of the stored examples shown to the LLM.")
    latency_ms: float = Field(description="Wall time spent on this text, in milliseconds.")

    def top(self, k: int) -> list[tuple[str, float]]:
        """The `k` most probable labels with their probabilities, most probable first."""
        return sorted(self.probabilities.items(), key=lambda item: -item[1])[:k]

    def summary(self, top: int = 3) -> dict:
        """The answer as plain JSON: what the command line prints and the LangChain tool returns."""
        return {
            "label": self.label,
            "labels": self.labels,
            "confidence": round(self.confidence, 4),
            "route": self.route.value,
            "top": [{"label": label, "probability": round(p, 4)} for label, p in self.top(top)],
        }
