"""Label-bias calibration of the LLM: a temperature and one offset per label, fitted on the dev set by likelihood.

Why: a small LLM leans toward some labels whatever the text (Gemma 3 270M answers "spam" to most of sms_spam), and a
temperature alone cannot undo that, since it never changes which label wins. Adding a per-label offset to the
LLM's scaled log-probabilities before the softmax is the multinomial version of Platt scaling ("bias + temperature"
in Zhao et al. 2021 and the calibration literature after it); it needs only the dev texts' scores, which
`calibrate` has already asked for, so it costs no LLM call. Unlike contextual calibration (the "N/A" twin prompt)
it is fitted on what the dev texts say, not on one content-free guess, and it is free at answer time.

It is used only where it helps: the offsets are kept when, fitted on four fifths of the dev texts and tried on the
fifth left out (five folds), they raise the LLM's dev accuracy; otherwise the LLM is calibrated by temperature alone.
The offsets are shrunk toward zero (a Gaussian prior), so a label seen on few dev texts moves little.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import log_softmax, softmax

from labelcascade.fallback.calibration import LOG_TEMPERATURE_BOUNDS

FOLDS = 5
MIN_TEXTS = 2 * FOLDS  # fewer scored dev texts than this: no offsets (a fold would hold one text or none)
PRIOR_SCALE = 2.0  # standard deviation of the Gaussian prior on each offset, in scaled log-probability units


@dataclass(frozen=True)
class LabelBias:
    """A temperature and per-label offsets for the LLM's log-probabilities, and what the choice rested on."""

    temperature: float
    bias: np.ndarray
    accuracy_without: float  # the LLM's accuracy on held-out dev folds, temperature alone (= its plain accuracy)
    accuracy_with: float  # the same with the offsets fitted on the other folds


def biased_softmax(logprobs: np.ndarray, temperature: float, bias: np.ndarray | None = None) -> np.ndarray:
    """Probabilities over the candidates: softmax(logprobs / temperature + bias); -inf (not a candidate) stays 0."""
    scaled = logprobs / temperature
    return softmax(scaled if bias is None else scaled + bias, axis=1)


def fit(logprobs: np.ndarray, truth: np.ndarray) -> tuple[float, np.ndarray]:
    """The temperature and offsets that maximise the likelihood of the true labels (with the prior on the offsets).

    `logprobs` (n, labels): -inf outside each text's candidates; `truth`: each text's label index, its score finite."""
    n, labels = logprobs.shape
    rows = np.arange(n)
    finite = np.isfinite(logprobs)
    raw = np.where(finite, logprobs, 0.0)

    def loss(params: np.ndarray) -> tuple[float, np.ndarray]:
        log_t, bias = params[0], params[1:]
        scaled = np.where(finite, raw / np.exp(log_t) + bias, -np.inf)
        log_p = log_softmax(scaled, axis=1)
        p = np.exp(log_p)
        value = -log_p[rows, truth].sum() + (bias ** 2).sum() / (2 * PRIOR_SCALE ** 2)
        residual = p.copy()
        residual[rows, truth] -= 1.0  # d(-log p_true)/d(scaled)
        grad_bias = residual.sum(axis=0) + bias / PRIOR_SCALE ** 2
        grad_log_t = -(residual * np.where(finite, raw / np.exp(log_t), 0.0)).sum()
        return float(value), np.r_[grad_log_t, grad_bias]

    result = minimize(loss, np.zeros(labels + 1), jac=True, method="L-BFGS-B",
                      bounds=[LOG_TEMPERATURE_BOUNDS] + [(None, None)] * labels)
    return float(np.exp(result.x[0])), result.x[1:]


def fold_of(n: int, *, seed: int = 0) -> np.ndarray:
    """Each of n texts' fold: FOLDS folds of a fixed permutation."""
    return np.random.default_rng(seed).permutation(n) % FOLDS


def held_out_answers(logprobs: np.ndarray, truth: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """Each text's answer with offsets fitted on the other folds (`fold_of`), never on itself: the accuracy `choose`
    decides by, and that bench/llm.py reports."""
    folds = fold_of(len(truth), seed=seed)
    answers = np.empty(len(truth), dtype=int)
    for fold in range(FOLDS):
        held_out = folds == fold
        temperature, bias = fit(logprobs[~held_out], truth[~held_out])
        answers[held_out] = biased_softmax(logprobs[held_out], temperature, bias).argmax(axis=1)
    return answers


def choose(logprobs: np.ndarray, truth: np.ndarray, *, seed: int = 0) -> LabelBias | None:
    """Offsets fitted on all the scored dev texts, if they raise the LLM's held-out accuracy (see the module
    docstring); None when they do not, or when there are too few texts to tell. Texts without a label, or whose
    true label was not a candidate, say nothing about the offsets and are left out."""
    scored = truth >= 0
    scored[scored] = np.isfinite(logprobs[np.flatnonzero(scored), truth[scored]])
    logprobs, truth = logprobs[scored], truth[scored]
    if len(truth) < MIN_TEXTS or len(np.unique(truth)) < 2:
        return None
    right_with = int((held_out_answers(logprobs, truth, seed=seed) == truth).sum())
    right_without = int((logprobs.argmax(axis=1) == truth).sum())
    if right_with <= right_without:
        return None
    temperature, bias = fit(logprobs, truth)
    return LabelBias(temperature, bias, right_without / len(truth), right_with / len(truth))
