"""Turning SVM decision scores into probabilities that mean what they say, even at 8 examples per class.

Why a temperature and not sklearn's CalibratedClassifierCV: with a handful of examples per class, Platt or
isotonic calibration fits one curve per class on a few held-out points and lost accuracy in our probe
(BENCHMARKS.md, "Measurements behind the code"). A softmax over the SVM's decision scores keeps the SVM's ranking (so accuracy is
untouched) and has a single parameter, the temperature, which cross-validated scores pin down well.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit, log_softmax, softmax

# Search range for log(temperature). Decision scores of a linear SVM on unit vectors lie in about [-2, 2];
# temperatures from 0.005 to 20 cover everything from near-hard to near-uniform answers.
LOG_TEMPERATURE_BOUNDS = (np.log(0.005), np.log(20.0))


def softmax_with_temperature(scores: np.ndarray, temperature: float) -> np.ndarray:
    """Rows of class probabilities from rows of decision scores."""
    return softmax(scores / temperature, axis=1)


def fit_temperature(scores: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None) -> float:
    """The temperature that minimises the (weighted) negative log-likelihood of the true classes.

    `scores` are out-of-fold decision scores (n, n_classes), `y` the index of each row's true class.
    """
    weights = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, dtype=float)
    rows = np.arange(len(y))

    def nll(log_t: float) -> float:
        return float(-(weights * log_softmax(scores / np.exp(log_t), axis=1)[rows, y]).sum() / weights.sum())

    return float(np.exp(minimize_scalar(nll, bounds=LOG_TEMPERATURE_BOUNDS, method="bounded").x))


def fit_platt(scores: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """One sigmoid (a, b), shared by all labels, for multi-label answers: P(label) = sigmoid(a * score + b).

    `scores` and `y` are flattened over (text, label) pairs, so even few examples give many points.
    """
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=1e4).fit(scores.reshape(-1, 1), y)
    return float(model.coef_[0, 0]), float(model.intercept_[0])


def sigmoid(scores: np.ndarray, a: float, b: float) -> np.ndarray:
    return expit(a * scores + b)


def expected_calibration_error(
    proba: np.ndarray, y: np.ndarray, n_bins: int = 15, sample_weight: np.ndarray | None = None
) -> float:
    """ECE of the top-1 answer: the mean |accuracy - confidence| over equal-width confidence bins, weighted by size.

    `proba` is (n, n_classes), `y` the index of each row's true class. `sample_weight` (one per row, sklearn's
    convention) counts a row that many times: in each bin's accuracy and confidence and in the bin's size.
    """
    weight = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, dtype=float)
    confidence = proba.max(axis=1)
    correct = proba.argmax(axis=1) == y
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        in_bin = bins == b
        if in_bin.any():
            w = weight[in_bin]
            gap = np.average(correct[in_bin], weights=w) - np.average(confidence[in_bin], weights=w)
            ece += w.sum() / weight.sum() * abs(gap)
    return float(ece)
