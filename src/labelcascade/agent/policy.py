"""The cascade's knobs: when to trust the fallback, how to ask and weigh the LLM, when to abstain, when to learn.

A `Policy` is stored in the workspace's settings.json. The defaults are reasonable for an uncalibrated task;
`calibrate` (agent/calibration.py) replaces the thresholds, the LLM temperature and weight, and the number of
candidates with values measured on a labelled dev set.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


# The cached layout, as (static examples per label, retrieved examples): what `calibrate` tries beside the policy's own
# layout unless told which to compare. The prompt's static part, which the engine's prefix cache computes once per
# task, holds up to 8 examples per label (labels in turn, as many as its byte cap lets in) and nothing is retrieved,
# so a text computes little beyond its own tokens. With the label offsets `calibrate` fits, a small model answers
# better in it than with eight retrieved examples on most tasks whose labels all fit, and several times faster
# (BENCHMARKS.md, "LLM engines: the static layout"); fewer static examples plus retrieved ones did worse.
CACHED_LAYOUT = (8, 0)


class Policy(BaseModel):
    """How one task's texts are routed between the fallback and the LLM."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    accept_threshold: float = Field(
        0.9, ge=0, le=1,
        description="The fallback answers alone when its answer's probability is at least this (1: never).",
    )
    abstain_threshold: float = Field(
        0.0, ge=0, le=1, description="Tasks that allow abstaining answer none under this probability."
    )
    llm_weight: float = Field(
        0.5, ge=0, le=1,
        description="Weight of the LLM's probabilities in the mix with the fallback's; 0 never asks the LLM.",
    )
    llm_temperature: float = Field(1.0, gt=0, description="Divides the LLM's log-probabilities before normalising.")
    llm_label_bias: dict[str, float] = Field(
        default_factory=dict,
        description="Added to each label's scaled LLM log-probability before normalising (single-label tasks; a "
        "label not named gets 0): fitted by `calibrate` where it raises the LLM's dev accuracy, cancelling the "
        "model's leaning toward some labels (agent/label_bias.py).",
    )
    examples: int = Field(8, ge=0, description="Retrieved examples shown to the LLM (0: zero-shot).")
    static_examples: int = Field(
        0, ge=0,
        description="Examples per label shown to the LLM in the prompt's static part, the same for every text: the "
        "first ones people labelled, labels taken in turn. The engine's prefix cache computes them once per task, so "
        "they cost little per text where retrieved `examples` cost their length each time; the two combine. 0: none.",
    )
    examples_from_llm: bool = Field(
        False,
        description="Show the LLM its own past answers (`llm` examples) as examples too. Off: prompts show people's "
        "labels only, so an answer the LLM got wrong is not copied into its later answers.",
    )
    contextual_calibration: bool = Field(
        False,
        description="Subtract from each label's LLM log-probability the one it gets with the content-free text "
        "\"N/A\" in the same prompt (Zhao et al. 2021, 'Calibrate Before Use'), cancelling the model's leaning "
        "toward some labels whatever the text. One more prompt per text, differing from the first only in its last "
        "tokens: cheap where the engine reuses the prompt's prefix, twice the work where it does not. Off by "
        "default: with retrieved examples it also cancels what the examples say, which helps some tasks and hurts "
        "others (BENCHMARKS.md, 'LLM engines').",
    )
    max_candidates: int = Field(
        10, ge=2, description="Labels the LLM scores per text at most: the most likely by fallback and neighbours."
    )
    learn: bool = Field(True, description="Store confident LLM answers as examples and retrain from them.")
    learn_threshold: float = Field(
        0.9, ge=0, le=1, description="LLM answers at least this probable are stored as `llm` examples."
    )
    # 50: with the policy kept after retrains, the learning streams replayed ended at least as accurate in more
    # stream orders at 50 or 100 than at 20, and the LLM's share fell about as far (BENCHMARKS.md, "Learning from a
    # stream: the policy kept after retrains"); 50 learns sooner than 100 where LLM answers come slowly
    retrain_every: int = Field(
        50, ge=1, description="Retrain the fallback after this many new `llm` examples."
    )
    timeout_s: float = Field(
        30.0, gt=0, description="Seconds the engine may take per text; past it the batch is answered `degraded`."
    )
    llm_batch: int = Field(8, ge=1, description="Texts sent to the engine per call.")

    @property
    def asks_llm(self) -> bool:
        return self.llm_weight > 0 and self.accept_threshold > 0

    def accepts(self, certainty: np.ndarray) -> np.ndarray:
        """Which answers the fallback gives alone. A threshold of 1 accepts none, even saturated ones."""
        return (certainty >= self.accept_threshold) & (self.accept_threshold < 1.0)


def mix(fallback: np.ndarray, llm: np.ndarray, weight: float) -> np.ndarray:
    """Linear pool of the two probability vectors (rows): the fallback's over all labels, the LLM's over the
    candidates it scored (zero elsewhere). Pooling rather than switching keeps the fallback's view of labels the
    LLM never saw, and the weight says how much the LLM has earned on this task (calibrated)."""
    return weight * llm + (1.0 - weight) * fallback
