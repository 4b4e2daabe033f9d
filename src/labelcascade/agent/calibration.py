"""Calibrating the cascade on a labelled dev set: what the fallback may answer alone, and what the LLM is worth.

Two steps, so the policy can be chosen again for a new body or label without asking the LLM again:
1. `DevSet.measure` asks the LLM about every dev text once (dev texts are never stored, never learned from) and
   keeps what stays true while the fallback changes: the texts' vectors, their true labels, the LLM's
   probabilities, its temperature (fitted by likelihood) with, for single-label tasks, per-label offsets where they
   raise its held-out dev accuracy (the model's leaning toward some labels, cancelled: label_bias.py), and the number
   of candidates it scores (the smallest that keeps the true label among them for 98% of the texts it will see).
   The workspace keeps it (calibration.npz).
2. `choose_policy` takes the current fallback's probabilities on those texts and chooses:
   - the accept threshold: the fallback answers alone where (a) its answers keep the target precision (default
     0.95), or (b) asking the LLM would not raise the dev accuracy by more than `tolerance` (default 0.01): the
     cheapest threshold whose accuracy is within `tolerance` of the best any threshold and pooling weight reach.
     Optionally capped so that no more than `llm_budget` of the texts go to the LLM. For a new body or label the
     session chooses again by the same rule, with the budget at most the share sent before (session.py); a retrain
     of the fallback alone keeps the policy, and the LLM's share falls as the fallback, taught by the LLM, is more
     often sure. (`accuracy_floor`, a dev accuracy to keep instead of the best now reachable, spends every gain on
     asking the LLM less: the session's rule after retrains until 2026-12-05, it ended learning at the first one);
   - the LLM's weight in the pool with the fallback: the best dev accuracy on the texts the LLM will see. When no
     weight beats the fallback alone, the weight is 0 and nothing is sent to the LLM: on some tasks a small LLM
     does not help, and then it should cost nothing;
   - the learn threshold: the lowest probability at which the pooled answers on the LLM-bound dev texts keep
     `learn_precision` (default 0.85). It is lower than the answering target on purpose: an LLM label weighs at
     most half a gold example in training (fallback/weights.py), and the texts the LLM sees are the hard ones,
     where answers rarely reach 0.95 precision (at 0.95 our ag_news run learned nothing at all);
   - the abstain threshold, for tasks that allow it: answering gains 1 when right and loses 1 when wrong,
     abstaining gains 1 on a dev text that has no label and 0 otherwise; the threshold with the best total is kept.
   It also reports a coverage/precision table of the fallback.
The LLM's dev probabilities were measured with the examples the store held at calibration; after learning, the
LLM sees more examples, so they are a slightly pessimistic, fixed estimate of what asking it is worth.
"""

from __future__ import annotations

import functools
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field

from labelcascade.agent import label_bias
from labelcascade.agent.candidates import plausibility, smallest_m_for_recall
from labelcascade.agent.cascade import Cascade
from labelcascade.agent.policy import Policy
from labelcascade.atomic_file import replace_atomically
from labelcascade.fallback.calibration import fit_temperature
from labelcascade.packed_texts import packed_texts, unpacked_texts

TABLE_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
WEIGHTS = tuple(np.round(np.arange(0.1, 1.01, 0.1), 2))
CANDIDATE_RECALL = 0.98


class CoverageRow(BaseModel):
    threshold: float
    coverage: float = Field(description="Share of dev texts whose fallback answer is at least this probable.")
    precision: float | None = Field(description="Accuracy of the fallback on those texts (None when there are none).")


class Calibration(BaseModel):
    """What `choose_policy` chose and measured; stored in the workspace as calibration.json."""

    policy: Policy
    dev_texts: int
    target_precision: float
    learn_precision: float
    llm_budget: float | None = Field(
        description="The most of the dev texts the policy may send to the LLM: `calibrate`'s, and when the policy is "
        "chosen again at most the share sent before."
    )
    tolerance: float = Field(0.01, description="Dev accuracy the cascade may give up to send fewer texts to the LLM.")
    retrains: int = Field(0, description="Times the policy was chosen again since `calibrate` (a new body or label).")
    accuracy_floor: float | None = Field(
        None, description="The best dev accuracy reachable when the policy was chosen, or the one it was told to keep."
    )
    fallback_accuracy: float
    cascade_accuracy: float
    llm_share: float = Field(description="Share of dev texts the calibrated cascade sends to the LLM.")
    candidate_recall: float | None = Field(description="Share of LLM-bound dev texts whose true label is a candidate.")
    llm_accuracy_on_unsure: float | None = None
    fallback_accuracy_on_unsure: float | None = None
    learned_share: float | None = Field(None, description="Share of LLM-bound dev texts the cascade would learn from.")
    learned_precision: float | None = Field(None, description="Accuracy of the LLM answers it would learn from.")
    out_of_scope_texts: int = Field(0, description="Dev texts with no label (out of scope: the right answer is none).")
    out_of_scope_recall: float | None = Field(
        None, description="Share of the dev texts with no label that the chosen policy answers none.")
    in_scope_accuracy: float | None = Field(
        None, description="Accuracy of the chosen policy on the dev texts that have a label (abstaining counts wrong).")
    coverage: list[CoverageRow]
    notes: list[str] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list, description="Choices that rest on too few dev texts to trust.")

    def table(self) -> str:
        """The coverage/precision table and the choices, as markdown (`warnings` are logged by `calibrate`)."""
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
            *([f"out of scope: {self.out_of_scope_texts} dev texts with no label, {self.out_of_scope_recall:.1%} "
               f"answered none; in-scope accuracy {number_text(self.in_scope_accuracy)}"] if self.out_of_scope_texts else []),
            *self.notes,
        ]
        return "\n".join(lines)


@dataclass
class DevSet:
    """A labelled dev set as calibration measured it; see the module docstring (step 1).

    `truth`: single-label, the index of each text's label (-1: no label); multi-label, an indicator matrix.
    `llm`: the LLM's probabilities (temperature and label offsets applied; single-label 0 outside a text's
    candidates, multi-label NaN for labels not asked), or None when there is no engine. `label_bias`: the per-label
    offsets (agent/label_bias.py) where they raised the LLM's held-out dev accuracy, else None; `bias_accuracy`: that
    accuracy without and with them. `texts`: the dev texts, for a fallback that reads their n-grams (None in a dev
    set saved before they were kept).
    """

    vectors: np.ndarray
    truth: np.ndarray
    llm: np.ndarray | None = None
    temperature: float | None = None
    max_candidates: int | None = None
    candidate_recall: float | None = None
    label_bias: np.ndarray | None = None
    bias_accuracy: tuple[float, float] | None = None
    texts: list[str] | None = None

    @classmethod
    def measure(
        cls,
        cascade: Cascade,
        texts: Sequence[str],
        labels: Sequence[str | None] | Sequence[Sequence[str]],
        *,
        target_precision: float = 0.95,
        llm_budget: float | None = None,
        on_llm: Callable[[int, int], None] | None = None,
        policy: Policy | None = None,
        held_out_proba: np.ndarray | None = None,
    ) -> DevSet:
        """Embed the dev texts and ask the cascade's engine about all of them (raises EngineError if it cannot
        answer: a policy calibrated without it would be wrong). Single-label dev labels may be None (or "") for
        texts that have no label, if the task allows abstaining. `on_llm(asked, total)` is called before the
        first LLM batch and after each (the LLM's part is most of the time `calibrate` takes). `policy`: how to ask
        the LLM (examples shown; default: the cascade's), for comparing prompt layouts.

        `held_out_proba`: the dev texts are stored examples the fallback was trained on (calibrating without a dev
        set: `Session.calibrate_on_examples`); these are their fallback probabilities from models trained without
        them, and each text's own example is kept out of its neighbours, so that neither arm is shown the answer."""
        task, names = cascade.task, cascade.task.label_names
        if len(texts) != len(labels) or not texts:
            raise ValueError(f"calibrate needs labelled dev texts: got {len(texts)} texts and {len(labels)} labels")
        dev = cls(cascade.embedder.embed(list(texts)), _truth(labels, names, task.multi_label, task.allow_abstain),
                  texts=list(texts))
        if cascade.engine is None:
            return dev
        proba = cascade.probabilities(dev.vectors, dev.texts) if held_out_proba is None else held_out_proba
        policy = policy or cascade.policy
        neighbors = cascade.neighbors(dev.vectors, policy, left_out=None if held_out_proba is None else dev.texts)
        if not task.multi_label:
            # The candidates must hold the true label for the texts the LLM will see: those the fallback is unsure
            # of at the target precision (and budget), or every text when it is sure of all of them.
            certainty = cascade.certainty(proba)
            accept = _capped(accept_threshold(certainty, _correct(proba, dev.truth, False), target_precision),
                             certainty, llm_budget)
            unsure = np.flatnonzero(certainty < accept) if accept < 1 else np.arange(len(texts))
            unsure = unsure if len(unsure) else np.arange(len(texts))
            ranks = _true_ranks(proba, neighbors, names, dev.truth)
            m = smallest_m_for_recall(ranks[unsure][ranks[unsure] >= 0], len(names), CANDIDATE_RECALL)
            dev.max_candidates = m
            dev.candidate_recall = float(np.mean((ranks[unsure] >= 0) & (ranks[unsure] < m)))
            policy = policy.model_copy(update={"max_candidates": m})
        parts = []
        for batch in np.array_split(np.arange(len(texts)), int(np.ceil(len(texts) / policy.llm_batch))):
            if on_llm is not None:
                on_llm(int(batch[0]), len(texts))
            parts.append(cascade.llm_scores([texts[i] for i in batch], proba[batch], [neighbors[i] for i in batch],
                                            policy).logprobs)
        if on_llm is not None:
            on_llm(len(texts), len(texts))
        logprobs = np.concatenate(parts)
        dev.temperature = _fit_temperature(logprobs, dev.truth, task.multi_label)
        chosen = None if task.multi_label else label_bias.choose(logprobs, dev.truth)
        if chosen is not None:
            dev.temperature, dev.label_bias = chosen.temperature, chosen.bias
            dev.bias_accuracy = (chosen.accuracy_without, chosen.accuracy_with)
        dev.llm = cascade.llm_probabilities(logprobs, dev.temperature, dev.bias_by_label(names))
        return dev

    def bias_by_label(self, names: Sequence[str]) -> dict[str, float]:
        """The label offsets as the policy keeps them (by label name; empty when there are none)."""
        return {} if self.label_bias is None else dict(zip(names, self.label_bias.tolist(), strict=True))

    def with_label_added(self, *, multi_label: bool) -> DevSet:
        """This dev set for a task that gained a label after it was measured (the new label comes last, so the old
        indices hold): no dev text has it, and the LLM never scored it (probability 0 as for a label outside a
        text's candidates; multi-label: not asked). The policy can be chosen again on it without the LLM; only a
        new `calibrate` with texts of the new label measures it."""
        truth = np.pad(self.truth, ((0, 0), (0, 1))) if multi_label else self.truth
        llm = None if self.llm is None else np.pad(self.llm, ((0, 0), (0, 1)),
                                                   constant_values=np.nan if multi_label else 0.0)
        bias = None if self.label_bias is None else np.r_[self.label_bias, 0.0]
        return DevSet(self.vectors, truth, llm, self.temperature, self.max_candidates, self.candidate_recall, bias,
                      self.bias_accuracy, self.texts)

    def save(self, path: str | Path) -> None:
        """Plain arrays in one .npz (no pickle), written beside and renamed into place."""
        path = Path(path)
        arrays = {"vectors": self.vectors, "truth": self.truth}
        if self.texts is not None:
            arrays["text_bytes"], arrays["text_ends"] = packed_texts(self.texts)
        if self.llm is not None:
            arrays |= {"llm": self.llm, "temperature": np.array(self.temperature),
                       "candidate_recall": np.array(np.nan if self.candidate_recall is None else self.candidate_recall),
                       "max_candidates": np.array(-1 if self.max_candidates is None else self.max_candidates)}
            if self.label_bias is not None:
                arrays |= {"label_bias": self.label_bias, "bias_accuracy": np.array(self.bias_accuracy)}
        def write(temporary: Path) -> None:
            with temporary.open("wb") as file:  # a file, not a name: np.savez would add ".npz" to the name
                np.savez(file, **arrays)

        replace_atomically(path, write)

    @classmethod
    def load(cls, path: str | Path) -> DevSet:
        """The saved dev set; ValueError naming the file when it is damaged (never a policy from half a file)."""
        try:
            with np.load(path, allow_pickle=False) as saved:
                texts = unpacked_texts(saved["text_bytes"], saved["text_ends"]) if "text_ends" in saved else None
                dev = cls(saved["vectors"], saved["truth"], texts=texts)
                if "llm" in saved:
                    recall, m = float(saved["candidate_recall"]), int(saved["max_candidates"])
                    dev.llm, dev.temperature = saved["llm"], float(saved["temperature"])
                    dev.candidate_recall, dev.max_candidates = None if np.isnan(recall) else recall, None if m < 0 else m
                if "label_bias" in saved:
                    dev.label_bias, dev.bias_accuracy = saved["label_bias"], tuple(saved["bias_accuracy"].tolist())
        except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as error:  # np.load of an empty file: EOFError
            raise ValueError(f"{path}: damaged calibration data ({error}); run calibrate again") from None
        if len(dev.vectors) != len(dev.truth) or (dev.llm is not None and len(dev.llm) != len(dev.truth)) or (
                dev.texts is not None and len(dev.texts) != len(dev.truth)):
            raise ValueError(f"{path}: damaged calibration data (arrays of different lengths); run calibrate again")
        return dev


def choose_policy(
    cascade: Cascade,
    dev: DevSet,
    *,
    target_precision: float = 0.95,
    llm_budget: float | None = None,
    learn_precision: float = 0.85,
    tolerance: float = 0.01,
    accuracy_floor: float | None = None,
    policy: Policy | None = None,
    proba: np.ndarray | None = None,
) -> Calibration:
    """The cascade's policy for its current fallback, chosen on `dev` (see the module docstring, step 2); the
    cascade is unchanged. Knobs that calibration does not choose (examples, learn, retrain_every, ...) are kept from
    `policy` (default: the cascade's; the one `dev` was measured with). `accuracy_floor`: a dev accuracy to keep
    (None: the best now reachable, as `calibrate` and the session choose). `proba`: the fallback's probabilities on
    the dev texts (default: the current fallback's; held-out ones where the dev texts are its training texts)."""
    multi = cascade.task.multi_label
    proba = cascade.probabilities(dev.vectors, dev.texts) if proba is None else proba
    certainty = cascade.certainty(proba)
    fallback_right = _correct(proba, dev.truth, multi)
    precise = accept_threshold(certainty, fallback_right, target_precision)
    policy, notes = policy or cascade.policy, []
    final, on_unsure, learned, reachable = proba, (None, None), None, None
    if dev.llm is None:
        accept = _capped(precise, certainty, llm_budget)
        policy = policy.model_copy(update={"accept_threshold": accept})
        notes.append("no engine: only the fallback was calibrated")
        if accept < precise:
            notes.append(f"accept threshold lowered to send at most {llm_budget:.0%} of texts to the LLM")
    else:
        policy = policy.model_copy(update={"llm_temperature": dev.temperature,
                                           "llm_label_bias": dev.bias_by_label(cascade.task.label_names),
                                           "max_candidates": dev.max_candidates or policy.max_candidates})
        if dev.bias_accuracy is not None:
            notes.append(f"label offsets on: they raised the LLM's held-out dev accuracy from {dev.bias_accuracy[0]:.3f} "
                         f"to {dev.bias_accuracy[1]:.3f}")
        # the cheapest threshold is chosen within the budget; the precision rule only ever sends fewer texts
        cheapest = functools.partial(_cheapest_threshold, cascade, proba, certainty, fallback_right, dev,
                                     tolerance=tolerance, floor=accuracy_floor)
        cheapest_accept, reachable = cheapest(llm_budget)
        accept = min(precise, cheapest_accept)
        if llm_budget is not None and accept < min(precise, cheapest(None)[0]):
            notes.append(f"accept threshold lowered to send at most {llm_budget:.0%} of texts to the LLM")
        sent = ~policy.model_copy(update={"accept_threshold": accept}).accepts(certainty)
        weight = 0.0
        if sent.any():
            right = {w: _correct(cascade.pool(proba[sent], dev.llm[sent], w), dev.truth[sent], multi) for w in WEIGHTS}
            best = max(WEIGHTS, key=lambda w: (right[w].mean(), -w))  # ties: the smaller weight, which costs the same
            weight = float(best) if right[best].mean() > fallback_right[sent].mean() else 0.0
            on_unsure = (float(right[1.0].mean()), float(fallback_right[sent].mean()))
        policy = policy.model_copy(update={"accept_threshold": accept, "llm_weight": weight})
        if weight == 0:
            notes.append("the LLM did not beat the fallback on the dev texts it would see: nothing will be sent to it")
        else:
            final = proba.copy()
            final[sent] = cascade.pool(proba[sent], dev.llm[sent], weight)
            pooled_right, pooled_certainty = _correct(final[sent], dev.truth[sent], multi), cascade.certainty(final[sent])
            learn = accept_threshold(pooled_certainty, pooled_right, learn_precision)
            policy = policy.model_copy(update={"learn_threshold": learn})
            kept = pooled_certainty >= learn
            learned = (float(kept.mean()), float(pooled_right[kept].mean()) if kept.any() else None)
            if learn >= 1.0:
                notes.append(f"no LLM answer on the dev set kept {learn_precision:.0%} precision: nothing will be learned")
    if cascade.task.allow_abstain and not multi:
        policy = policy.model_copy(update={"abstain_threshold": abstain_threshold(final, dev.truth)})
    accuracy = float(_correct(final, dev.truth, multi).mean())
    scope = {} if multi else _scope_scores(final, dev.truth, policy.abstain_threshold if cascade.task.allow_abstain else 0.0)
    warnings = _few_texts_warnings(dev, sent if dev.llm is not None else None, policy, learned, scope)
    warnings += _uncovered_labels_warning(dev, cascade.task.label_names)
    return Calibration(
        policy=policy,
        dev_texts=len(dev.truth),
        target_precision=target_precision,
        learn_precision=learn_precision,
        llm_budget=llm_budget,
        tolerance=tolerance,
        accuracy_floor=reachable if accuracy_floor is None else accuracy_floor,
        fallback_accuracy=float(fallback_right.mean()),
        cascade_accuracy=accuracy,
        llm_share=float(np.mean(~policy.accepts(certainty))) if policy.asks_llm and dev.llm is not None else 0.0,
        candidate_recall=dev.candidate_recall,
        llm_accuracy_on_unsure=on_unsure[0],
        fallback_accuracy_on_unsure=on_unsure[1],
        learned_share=None if learned is None else learned[0],
        learned_precision=None if learned is None else learned[1],
        coverage=coverage_table(certainty, fallback_right, (*TABLE_THRESHOLDS, accept)),
        notes=notes,
        warnings=warnings,
        **scope,
    )


# Under this many dev texts a threshold or a weight chosen on them is a guess (one text more or less moves it), so
# calibrate says so instead of printing a precision of 1.000 measured on one text.
FEW_DEV_TEXTS = 20


def _scope_scores(final: np.ndarray, truth: np.ndarray, abstain: float) -> dict:
    """Single-label, with dev texts that have no label: how the chosen policy treats them and the others."""
    none_true = truth < 0
    if not none_true.any():
        return {}
    answered = final.max(axis=1) >= abstain
    right = answered & (final.argmax(axis=1) == truth)
    return {"out_of_scope_texts": int(none_true.sum()),
            "out_of_scope_recall": float(np.mean(~answered[none_true])),
            "in_scope_accuracy": float(right[~none_true].mean()) if (~none_true).any() else None}


def _few_texts_warnings(dev: DevSet, sent: np.ndarray | None, policy: Policy, learned, scope: dict) -> list[str]:
    warnings = []
    if len(dev.truth) < FEW_DEV_TEXTS:
        warnings.append(f"only {len(dev.truth)} dev texts: every threshold rests on them; give at least "
                        f"{FEW_DEV_TEXTS} (a few per label) for choices worth trusting")
    elif sent is not None and policy.llm_weight > 0 and sent.sum() < FEW_DEV_TEXTS:
        learned_on = "" if learned is None else f" and the learn threshold (dev precision {number_text(learned[1])})"
        warnings.append(f"the LLM's weight{learned_on} rest on the {int(sent.sum())} dev texts the fallback is unsure "
                        f"of; give more dev texts, at least {FEW_DEV_TEXTS} of them unsure")
    if 0 < scope.get("out_of_scope_texts", 0) < FEW_DEV_TEXTS // 4:
        warnings.append(f"the abstain threshold rests on {scope['out_of_scope_texts']} dev texts with no label; "
                        f"give at least {FEW_DEV_TEXTS // 4} out-of-scope texts")
    return warnings


def _uncovered_labels_warning(dev: DevSet, names: Sequence[str]) -> list[str]:
    """Label offsets fitted on dev texts that hold none of some labels push those labels down: for the offsets, a
    label the dev texts never show is a rare one. That is right when the dev texts are drawn as the texts to classify
    are, and wrong when they were picked from a few labels (a file sorted by label, cut short): then the LLM is taught
    to avoid the labels left out. Said, not undone: calibrate cannot tell which of the two it was given."""
    if dev.label_bias is None:
        return []
    present = set(dev.truth[dev.truth >= 0].tolist())
    missing = [name for i, name in enumerate(names) if i not in present]
    if not missing:
        return []
    shown = ", ".join(repr(name) for name in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    return [f"the LLM's label offsets were fitted on dev texts that hold none of {len(missing)} of the {len(names)} labels "
            f"({shown}): the LLM now leans away from them as if they were rare; if the dev texts were not drawn as the "
            "texts to classify are (all labels in their usual shares), give dev texts of those labels and calibrate again"]


def number_text(value: float | None) -> str:
    """A share or accuracy as a table shows it: three decimals, "-" when there is none."""
    return "-" if value is None else f"{value:.3f}"


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


def _cheapest_threshold(cascade, proba, certainty, fallback_right, dev, llm_budget, *, tolerance, floor):
    """The lowest accept threshold whose dev accuracy (at its best pooling weight) is within `tolerance` of the best
    accuracy any threshold within the budget reaches, or at least `floor` if that is lower (0, the fallback answers
    everything, when the LLM adds nothing); and that best accuracy."""
    multi = cascade.task.multi_label
    thresholds = np.unique(np.r_[0.0, certainty, 1.0])
    sent = np.array([certainty < t if t < 1 else np.ones_like(certainty, dtype=bool) for t in thresholds])
    pooled_right = np.array([_correct(cascade.pool(proba, dev.llm, w), dev.truth, multi) for w in WEIGHTS])
    # accuracy[w, t]: the pooled answer where text is sent at threshold t, the fallback's elsewhere
    accuracy = np.where(sent[None], pooled_right[:, None], fallback_right[None, None]).mean(axis=2).max(axis=0)
    within_budget = sent.mean(axis=1) <= (1.0 if llm_budget is None else llm_budget)
    within_budget[0] = True  # sending nothing is always affordable
    best = float(accuracy[within_budget].max())
    goal = best - tolerance if floor is None else min(best - tolerance, floor)
    return float(thresholds[np.flatnonzero(within_budget & (accuracy >= goal - 1e-12))[0]]), best


def _capped(threshold: float, certainty: np.ndarray, llm_budget: float | None) -> float:
    """`threshold`, lowered if needed so that at most `llm_budget` of the texts are sent to the LLM."""
    sent = np.mean(certainty < threshold) if threshold < 1 else 1.0
    if llm_budget is None or sent <= llm_budget:
        return threshold
    return float(np.quantile(certainty, llm_budget, method="inverted_cdf"))


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
