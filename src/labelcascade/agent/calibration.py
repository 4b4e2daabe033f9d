"""Calibrating the cascade on a labelled dev set: what the fallback may answer alone, and what the LLM is worth.

From the dev texts (never stored, never learned from) `calibrate` measures and chooses:
- the accept threshold: the lowest at which the fallback's answers keep the target precision (default 0.95),
  optionally capped so that no more than `llm_budget` of the texts go to the LLM;
- the number of candidates the LLM scores: the smallest that keeps the true label among them for 98% of the
  texts it will see;
- the LLM's temperature, by likelihood, and its weight in the pool with the fallback: the weight with the best dev
  accuracy on the texts the LLM sees. When no weight beats the fallback alone, the weight is 0 and the cascade
  sends nothing to the LLM: on some tasks a small LLM does not help, and then it should cost nothing;
- the learn threshold: the lowest probability at which the cascade's (pooled) LLM answers on the dev set keep
  `learn_precision` (default 0.85). It is lower than the answering target on purpose:
  an LLM label weighs at most half a gold example in training (fallback/weights.py), and the texts the LLM sees
  are the hard ones, where answers rarely reach 0.95 precision; at 0.95 our ag_news run learned nothing at all;
- the abstain threshold, for tasks that allow it: answering gains 1 when right and loses 1 when wrong, abstaining
  gains 1 on a dev text that has no label and 0 otherwise; the threshold with the best total is kept.
It also reports a coverage/precision table of the fallback.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, Field

from labelcascade.agent.candidates import plausibility, smallest_m_for_recall
from labelcascade.agent.cascade import Cascade
from labelcascade.agent.policy import Policy
from labelcascade.fallback.calibration import fit_temperature

TABLE_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
WEIGHTS = tuple(np.round(np.arange(0.1, 1.01, 0.1), 2))
CANDIDATE_RECALL = 0.98


class CoverageRow(BaseModel):
    threshold: float
    coverage: float = Field(description="Share of dev texts whose fallback answer is at least this probable.")
    precision: float | None = Field(description="Accuracy of the fallback on those texts (None when there are none).")


class Calibration(BaseModel):
    """What `calibrate` chose and measured; stored in the workspace as calibration.json."""

    policy: Policy
    dev_texts: int
    target_precision: float
    learn_precision: float
    llm_budget: float | None
    fallback_accuracy: float
    cascade_accuracy: float
    llm_share: float = Field(description="Share of dev texts the calibrated cascade sends to the LLM.")
    candidate_recall: float | None = Field(description="Share of LLM-bound dev texts whose true label is a candidate.")
    llm_accuracy_on_unsure: float | None = None
    fallback_accuracy_on_unsure: float | None = None
    learned_share: float | None = Field(None, description="Share of LLM-bound dev texts the cascade would learn from.")
    learned_precision: float | None = Field(None, description="Accuracy of the LLM answers it would learn from.")
    coverage: list[CoverageRow]
    notes: list[str] = Field(default_factory=list)

    def table(self) -> str:
        """The coverage/precision table and the choices, as markdown."""
        lines = ["| accept threshold | coverage | precision |", "|---|---|---|"]
        for row in self.coverage:
            precision = "-" if row.precision is None else f"{row.precision:.3f}"
            lines.append(f"| {row.threshold:.3f} | {row.coverage:.3f} | {precision} |")
        p = self.policy
        lines += [
            "",
            f"dev texts: {self.dev_texts}; fallback accuracy {self.fallback_accuracy:.3f}; "
            f"cascade accuracy {self.cascade_accuracy:.3f}; sent to the LLM {self.llm_share:.1%}",
            f"chosen: accept {p.accept_threshold:.3f}, LLM weight {p.llm_weight:.1f}, LLM temperature "
            f"{p.llm_temperature:.3f}, candidates {p.max_candidates}, learn from {p.learn_threshold:.3f}, "
            f"abstain {p.abstain_threshold:.3f}",
            *([f"learns from {self.learned_share:.0%} of the LLM answers (dev precision {self.learned_precision:.3f})"]
              if self.learned_precision is not None else []),
            *self.notes,
        ]
        return "\n".join(lines)


def calibrate(
    cascade: Cascade,
    texts: Sequence[str],
    labels: Sequence[str | None] | Sequence[Sequence[str]],
    *,
    target_precision: float = 0.95,
    llm_budget: float | None = None,
    learn_precision: float = 0.85,
) -> Calibration:
    """Choose the cascade's policy from labelled dev texts (see the module docstring); the cascade is unchanged.

    Single-label dev labels may be None (or "") for texts that have no label, if the task allows abstaining.
    Raises EngineError if the cascade has an engine that cannot answer: a policy calibrated without it would be wrong.
    """
    task, names = cascade.task, cascade.task.label_names
    if len(texts) != len(labels) or not texts:
        raise ValueError(f"calibrate needs labelled dev texts: got {len(texts)} texts and {len(labels)} labels")
    truth = _truth(labels, names, task.multi_label, task.allow_abstain)
    vectors = cascade.embedder.embed(list(texts))
    proba = cascade.probabilities(vectors)
    certainty = cascade.certainty(proba)
    fallback_right = _correct(proba, truth, task.multi_label)

    accept = accept_threshold(certainty, fallback_right, target_precision)
    notes = []
    policy = cascade.policy.model_copy(update={"accept_threshold": accept})
    if llm_budget is not None and np.mean(~policy.accepts(certainty)) > llm_budget:
        accept = float(np.quantile(certainty, llm_budget, method="inverted_cdf"))
        policy = policy.model_copy(update={"accept_threshold": accept})
        notes.append(f"accept threshold lowered to send at most {llm_budget:.0%} of texts to the LLM")
    unsure = np.flatnonzero(~policy.accepts(certainty))

    final, recall, on_unsure, learned = proba, None, (None, None), None
    if cascade.engine is not None and len(unsure):
        neighbors = cascade.neighbors(vectors[unsure])
        if not task.multi_label:
            ranks = _true_ranks(proba[unsure], neighbors, names, truth[unsure])
            m = smallest_m_for_recall(ranks[ranks >= 0], len(names), CANDIDATE_RECALL)
            recall = float(np.mean((ranks >= 0) & (ranks < m)))
            policy = policy.model_copy(update={"max_candidates": m})
        policy, final, on_unsure, learned = _fit_llm(
            cascade, policy, texts, proba, unsure, neighbors, truth, learn_precision
        )
        if policy.llm_weight == 0:
            notes.append("the LLM did not beat the fallback on the unsure dev texts: nothing will be sent to it")
        elif policy.learn_threshold >= 1.0:
            notes.append(f"no LLM answer on the dev set kept {learn_precision:.0%} precision: nothing will be learned")
    elif cascade.engine is None:
        notes.append("no engine: only the fallback was calibrated")

    if task.allow_abstain and not task.multi_label:
        policy = policy.model_copy(update={"abstain_threshold": abstain_threshold(final, truth)})
    answered = _correct(final, truth, task.multi_label)
    return Calibration(
        policy=policy,
        dev_texts=len(texts),
        target_precision=target_precision,
        learn_precision=learn_precision,
        llm_budget=llm_budget,
        fallback_accuracy=float(fallback_right.mean()),
        cascade_accuracy=float(answered.mean()),
        llm_share=float(len(unsure) / len(texts)) if policy.asks_llm and cascade.engine is not None else 0.0,
        candidate_recall=recall,
        llm_accuracy_on_unsure=on_unsure[0],
        fallback_accuracy_on_unsure=on_unsure[1],
        learned_share=None if learned is None else learned[0],
        learned_precision=None if learned is None else learned[1],
        coverage=coverage_table(certainty, fallback_right, (*TABLE_THRESHOLDS, accept)),
        notes=notes,
    )


def accept_threshold(certainty: np.ndarray, correct: np.ndarray, target: float) -> float:
    """The lowest threshold t with precision(certainty >= t) >= target; 1.0 when no threshold reaches it."""
    order = np.argsort(-certainty, kind="stable")
    sorted_certainty = certainty[order]
    precision = np.cumsum(correct[order]) / np.arange(1, len(order) + 1)
    # Only cut between distinct values: a threshold admits every text at least that sure.
    last_of_value = np.r_[sorted_certainty[1:] != sorted_certainty[:-1], True]
    ok = np.flatnonzero(last_of_value & (precision >= target))
    return float(sorted_certainty[ok[-1]]) if len(ok) else 1.0


def coverage_table(certainty: np.ndarray, correct: np.ndarray, thresholds: Sequence[float]) -> list[CoverageRow]:
    rows = []
    for threshold in sorted(set(float(t) for t in thresholds)):
        covered = certainty >= threshold
        precision = float(correct[covered].mean()) if covered.any() else None
        rows.append(CoverageRow(threshold=threshold, coverage=float(covered.mean()), precision=precision))
    return rows


def abstain_threshold(proba: np.ndarray, truth: np.ndarray) -> float:
    """The abstain threshold with the best dev utility: +1 right answer, -1 wrong one, +1 abstaining on no-label."""
    confidence, answer = proba.max(axis=1), proba.argmax(axis=1)
    gain_if_answered = np.where(answer == truth, 1.0, -1.0)
    gain_if_abstained = np.where(truth < 0, 1.0, 0.0)
    best, best_utility = 0.0, gain_if_answered.sum()
    for threshold in np.unique(confidence):
        below = confidence < threshold
        utility = gain_if_abstained[below].sum() + gain_if_answered[~below].sum()
        if utility > best_utility:
            best, best_utility = float(threshold), utility
    return best


def _fit_llm(cascade, policy, texts, proba, unsure, neighbors, truth, learn_precision):
    """LLM temperature by likelihood, the pooling weight by accuracy, then the learn threshold by precision, on the
    unsure dev texts."""
    multi = cascade.task.multi_label
    logprobs = np.concatenate([
        cascade.llm_scores([texts[i] for i in batch], proba[batch], [neighbors[k] for k in positions], policy).logprobs
        for batch, positions in _batches(unsure, policy.llm_batch)
    ])
    temperature = _fit_temperature(logprobs, truth[unsure], multi)
    llm = cascade.llm_probabilities(logprobs, temperature)
    fallback_right = _correct(proba[unsure], truth[unsure], multi).mean()
    accuracy = {w: _correct(cascade.pool(proba[unsure], llm, w), truth[unsure], multi).mean() for w in WEIGHTS}
    weight = max(WEIGHTS, key=lambda w: (accuracy[w], -w))  # ties: the smaller weight, which costs the same
    if accuracy[weight] <= fallback_right:
        weight = 0.0
    policy = policy.model_copy(update={"llm_temperature": temperature, "llm_weight": float(weight)})
    final = proba.copy()
    learned = None
    if weight > 0:
        final[unsure] = cascade.pool(proba[unsure], llm, weight)
        pooled_right, pooled_certainty = _correct(final[unsure], truth[unsure], multi), cascade.certainty(final[unsure])
        learn = accept_threshold(pooled_certainty, pooled_right, learn_precision)
        policy = policy.model_copy(update={"learn_threshold": learn})
        kept = pooled_certainty >= learn
        learned = (float(kept.mean()), float(pooled_right[kept].mean()) if kept.any() else None)
    llm_alone = _correct(np.nan_to_num(llm), truth[unsure], multi).mean() if not multi else accuracy[1.0]
    return policy, final, (float(llm_alone), float(fallback_right)), learned


def _fit_temperature(logprobs: np.ndarray, truth: np.ndarray, multi: bool) -> float:
    if multi:
        asked = ~np.isnan(logprobs)
        odds, applies = logprobs[asked], truth[asked].astype(int)
        # a yes/no question is a softmax over [log-odds, 0]
        return fit_temperature(np.stack([odds, np.zeros_like(odds)], axis=1), 1 - applies)
    scored = (truth >= 0) & np.isfinite(logprobs[np.arange(len(truth)), np.maximum(truth, 0)])
    if not scored.any():
        return 1.0
    return fit_temperature(logprobs[scored], truth[scored])


def _batches(indices: np.ndarray, size: int):
    for start in range(0, len(indices), size):
        yield indices[start : start + size], range(start, min(start + size, len(indices)))


def _true_ranks(proba, neighbors, names, truth) -> np.ndarray:
    """Rank of the true label by plausibility (0 = first) per text; -1 for texts without a label."""
    ranks = np.full(len(truth), -1)
    for i, (row, label) in enumerate(zip(proba, truth, strict=True)):
        if label >= 0:
            order = np.argsort(-plausibility(row, neighbors[i], names), kind="stable")
            ranks[i] = int(np.flatnonzero(order == label)[0])
    return ranks


def _truth(labels, names: list[str], multi_label: bool, allow_none: bool) -> np.ndarray:
    """Single-label: the index of each text's label (-1: no label). Multi-label: an indicator matrix."""
    position = {name: i for i, name in enumerate(names)}

    def index(label, row: int) -> int:
        if label not in position:
            raise ValueError(f"dev row {row}: unknown label {label!r}; the task's labels are {names}")
        return position[label]

    if multi_label:
        matrix = np.zeros((len(labels), len(names)), dtype=bool)
        for row, value in enumerate(labels):
            for label in [value] if isinstance(value, str) else value:
                matrix[row, index(label, row)] = True
        return matrix
    truth = np.empty(len(labels), dtype=int)
    for row, label in enumerate(labels):
        if label is None or label == "":
            if not allow_none:
                raise ValueError(f"dev row {row}: no label, but the task does not allow abstaining")
            truth[row] = -1
        else:
            truth[row] = index(label, row)
    return truth


def _correct(proba: np.ndarray, truth: np.ndarray, multi_label: bool) -> np.ndarray:
    if multi_label:
        return ((proba >= 0.5) == truth).all(axis=1)
    return proba.argmax(axis=1) == truth
