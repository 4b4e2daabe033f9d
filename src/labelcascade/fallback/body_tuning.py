"""Fine-tuning the student's embedding body on a task's labelled texts, the way SetFit does it.

A frozen sentence-transformers body places texts by what they are about in general; a few minutes of contrastive
tuning on the task's own examples pulls texts of one label together and pushes the others apart, which is what
lets SetFit beat a frozen body + linear head by several points at 8 examples per class (BENCHMARKS.md). The tuned
body then serves everything the frozen one served: the SVM head is fitted on its vectors and the LLM's few-shot
examples are retrieved with them.

The method is SetFit's: pairs of texts drawn per training text (one with a text of its own label, one with a text of
another label), each pair's cosine similarity pulled to 1 or 0 by sentence-transformers' `CosineSimilarityLoss`,
AdamW at 2e-5 with a linear warm-up and decay (`learning_rate_factor`), one pass. The loss is sentence-transformers'
own; the loop is a few lines of torch so that training needs neither `setfit` nor `accelerate` (the trainers of
both depend on it), and so that it can stop at a deadline.

Cost follows the tokens that pass through the body more than the pairs (long news texts cost three times what short
questions do), so the pairs are planned from a token budget (SetFit's 20 iterations where they fit, fewer for many
or long texts, as bench/setfit_anchor.py measured), and `max_seconds` stops the pass where it has got to. By default
that limit follows the plan (`planned_seconds`): a fixed few minutes where the budget's plan fits, longer in proportion
where even one iteration exceeds the budget (many labels of long texts, as csldcp's abstracts), since a pass cut
short of one iteration gained little over the frozen body, or lost (BENCHMARKS.md, "Student: what three seeds say").
The tuned body's weights are written as safetensors only, never as a pickle.

Tuning again on gold + LLM labels (`Session.retrain(body=True)`, distillation) weighs each pair by its two texts'
sample weights (fallback/weights.py: an unsure LLM label counts less than a person's), and takes each pair's target
from the labels' confidences: the chance the two texts share a label if each text's label is right with its
confidence and wrong evenly over the others (1 or 0 for two gold texts, as above). The labels' full distributions
are not stored, so that is as soft as the targets can be.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from labelcascade.body_prompt import default_prompt

MAX_ITERATIONS = 20  # SetFit's customary iterations: pairs drawn per training text, twice (one of each kind)
TOKEN_BUDGET = 80_000  # body tokens per tuning run; what bench/setfit_anchor.py fitted in 2-3 minutes on one core
DEFAULT_MAX_SECONDS = 240.0  # the limit for a plan within TOKEN_BUDGET, with room for a slower machine
BATCH_SIZE = 16  # pairs per step, SetFit's default
LEARNING_RATE = 2e-5  # SetFit's default for the body
WARMUP_SHARE = 0.1


@dataclass(frozen=True)
class TuningReport:
    """What a tuning run did: the pairs planned and trained, the iterations planned, the time it took, whether it
    stopped at its deadline, and that deadline."""

    pairs_planned: int
    pairs_trained: int
    iterations: int
    seconds: float
    stopped_at_deadline: bool
    max_seconds: float  # the time limit the pass ran under: the one given, or `planned_seconds`


def iterations_for(train_tokens: int, token_budget: int = TOKEN_BUDGET) -> int:
    """Iterations (each 2 pairs per training text, so about 4 x `train_tokens` body tokens) that fit the budget,
    within [1, MAX_ITERATIONS]."""
    return max(1, min(MAX_ITERATIONS, round(token_budget / max(4 * train_tokens, 1))))


def planned_seconds(pair_tokens: int, iterations: int, token_budget: int = TOKEN_BUDGET) -> float:
    """The default time limit of a pass whose pairs hold `pair_tokens` body tokens in `iterations`: DEFAULT_MAX_SECONDS
    for a plan of two or more iterations (under the budget, or over it by a rounding of the iterations), and for a
    single iteration over the budget, DEFAULT_MAX_SECONDS times the excess: the same room per token."""
    if iterations > 1:
        return DEFAULT_MAX_SECONDS
    return DEFAULT_MAX_SECONDS * max(1.0, pair_tokens / token_budget)


def learning_rate_factor(step: int, steps: int, time_used: float) -> float:
    """SetFit's schedule, linear warm-up over the first WARMUP_SHARE of the steps, then linear decay to zero, with
    the decay measured by whichever is further along: the steps or the time budget (`time_used`, a share of
    `max_seconds`). A pass cut short by its deadline thus still ends at a low learning rate, as a full one does,
    instead of stopping at its peak."""
    warmup = max(1, int(WARMUP_SHARE * steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = max((step - warmup) / max(steps - warmup, 1), time_used)
    return max(0.0, 1.0 - progress)


def contrastive_pairs(labels: Sequence[str], iterations: int, seed: int = 0) -> list[tuple[int, int, float]]:
    """SetFit's pairs: for each iteration and each text, one pair with another text of its label (target 1.0; none
    for a label with a single text) and one with a text of another label (target 0.0). Index pairs, shuffled."""
    rng = random.Random(seed)
    by_label: dict[str, list[int]] = {}
    for index, label in enumerate(labels):
        by_label.setdefault(label, []).append(index)
    if len(by_label) < 2:
        raise ValueError(f"tuning needs texts of at least 2 labels, got only {sorted(by_label)}")
    pairs = []
    for _ in range(iterations):
        for index, label in enumerate(labels):
            same = [other for other in by_label[label] if other != index]
            if same:
                pairs.append((index, rng.choice(same), 1.0))
            other_label = rng.choice([name for name in by_label if name != label])
            pairs.append((index, rng.choice(by_label[other_label]), 0.0))
    rng.shuffle(pairs)
    return pairs


def pair_targets(labels: Sequence[str], confidences: Sequence[float], pairs: Sequence[tuple[int, int, float]]
                 ) -> list[float]:
    """Each pair's soft target: the chance its two texts share a label when text i's label is right with
    probability `confidences[i]` and otherwise any other label alike. Two texts of confidence 1 give 1.0 or 0.0."""
    names = sorted(set(labels))
    column = {name: position for position, name in enumerate(names)}
    confidence = np.clip(np.asarray(confidences, dtype=np.float64), 0.0, 1.0)
    spread = np.repeat(((1.0 - confidence) / (len(names) - 1))[:, None], len(names), axis=1)
    spread[np.arange(len(labels)), [column[label] for label in labels]] = confidence
    return [float(spread[first] @ spread[second]) for first, second, _ in pairs]


def tune_body(
    base_dir: str | Path,
    texts: Sequence[str],
    labels: Sequence[str],
    out_dir: str | Path,
    *,
    weights: Sequence[float] | None = None,
    confidences: Sequence[float] | None = None,
    max_seconds: float | None = None,
    token_budget: int = TOKEN_BUDGET,
    seed: int = 0,
    freeze_token_embeddings: bool = False,
    on_step: Callable[[int, int], None] | None = None,
) -> TuningReport:
    """Tune the sentence-transformers body in `base_dir` on `texts` and their `labels` (one label per text) and
    save it to `out_dir` (safetensors weights). Deterministic for a seed on one machine and thread count, unless
    the time limit is reached (then how far it got depends on the machine's speed).

    `weights` (one per text; None: all alike) weigh each pair's loss by the product of its texts' weights;
    `confidences` (one per text; None: all 1) make the pairs' targets soft (`pair_targets`). `max_seconds` bounds
    the training pass (the body is saved as far as it got; None: `planned_seconds` for the
    pairs planned); `token_budget` plans the pairs;
    `freeze_token_embeddings` keeps the token embedding matrix as it is (for a large vocabulary, where AdamW's
    update of it costs more than the rest of a step); `on_step(pairs trained, pairs planned)` is called after
    every step (a progress bar).
    """
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels; give one label per text")
    if not all(isinstance(label, str) for label in labels):
        raise ValueError("tuning takes one label per text (single-label tasks); a multi-label task keeps its "
                         "frozen body")
    for name, values in (("weights", weights), ("confidences", confidences)):
        if values is not None and len(values) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(values)} {name}; give one per text")
    if weights is not None and len(weights) and (not np.all(np.isfinite(weights)) or np.min(weights) < 0):
        raise ValueError("weights must be finite and not negative")
    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(f"max_seconds must be positive (or None: as long as the plan needs), got {max_seconds!r}")
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import CosineSimilarityLoss

    started = time.monotonic()
    torch.manual_seed(seed)
    model = SentenceTransformer(str(base_dir), device="cpu", local_files_only=True)
    # A body that embeds with a prompt (E5's "query: ") is tuned on what it embeds at answer time.
    prompt = default_prompt(model)
    tokens = [len(ids) for ids in model.tokenizer([prompt + text for text in texts], truncation=True,
                                                  max_length=model.max_seq_length)["input_ids"]]
    iterations = iterations_for(sum(tokens), token_budget)
    pairs = contrastive_pairs(labels, iterations, seed)
    if max_seconds is None:
        max_seconds = planned_seconds(sum(tokens[first] + tokens[second] for first, second, _ in pairs), iterations,
                                      token_budget)
    targets = [pair[2] for pair in pairs] if confidences is None else pair_targets(labels, confidences, pairs)
    pair_weights = None if weights is None else [float(weights[first]) * float(weights[second])
                                                 for first, second, _ in pairs]
    steps = -(-len(pairs) // BATCH_SIZE)
    # Weighted: the loss of each pair, then their weighted mean; unweighted, sentence-transformers' own mean.
    loss_function = CosineSimilarityLoss(model, loss_fct=torch.nn.MSELoss(reduction="mean" if pair_weights is None
                                                                          else "none"))
    if freeze_token_embeddings:
        model[0].auto_model.get_input_embeddings().weight.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    model.train()
    trained, stopped = 0, False
    for step, start in enumerate(range(0, len(pairs), BATCH_SIZE)):
        elapsed = time.monotonic() - started
        if elapsed >= max_seconds:
            stopped = True
            break
        for group in optimizer.param_groups:
            group["lr"] = LEARNING_RATE * learning_rate_factor(step, steps, elapsed / max_seconds)
        batch = pairs[start : start + BATCH_SIZE]
        features = [model.preprocess([texts[pair[side]] for pair in batch], prompt=prompt or None) for side in (0, 1)]
        loss = loss_function(features, torch.tensor(targets[start : start + BATCH_SIZE], dtype=torch.float32))
        if pair_weights is not None:
            batch_weights = torch.tensor(pair_weights[start : start + BATCH_SIZE], dtype=torch.float32)
            loss = (loss * batch_weights).sum() / batch_weights.sum().clamp_min(1e-12)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        trained += len(batch)
        if on_step is not None:
            on_step(trained, len(pairs))
    model.eval()
    model.save(str(out_dir), create_model_card=False, safe_serialization=True)
    return TuningReport(len(pairs), trained, iterations, time.monotonic() - started, stopped, max_seconds)
