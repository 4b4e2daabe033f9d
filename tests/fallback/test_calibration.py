import numpy as np
import pytest
from scipy.special import softmax

from labelcascade.fallback.calibration import expected_calibration_error, fit_temperature


def test_fit_temperature_recovers_the_temperature_that_generated_the_labels():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(4000, 5))
    y = np.array([rng.choice(5, p=p) for p in softmax(scores / 0.5, axis=1)])
    assert abs(fit_temperature(scores, y) - 0.5) < 0.05


def test_fit_temperature_honours_sample_weights():
    scores = np.array([[2.0, 0.0], [2.0, 0.0]])
    y = np.array([0, 1])
    # With equal weights the best temperature makes both classes near-equal; weighting the correct row makes it sharp.
    assert fit_temperature(scores, y, np.array([100.0, 1.0])) < fit_temperature(scores, y)


def test_ece_of_perfectly_calibrated_and_of_overconfident_answers():
    rng = np.random.default_rng(1)
    confidence = rng.uniform(0.5, 1.0, size=20000)
    correct = rng.uniform(size=20000) < confidence
    proba = np.column_stack([confidence, 1 - confidence])
    y = np.where(correct, 0, 1)
    assert expected_calibration_error(proba, y) < 0.02
    overconfident = np.column_stack([np.full(1000, 0.99), np.full(1000, 0.01)])
    half_right = np.arange(1000) % 2
    assert abs(expected_calibration_error(overconfident, half_right) - 0.49) < 1e-9


def test_ece_sample_weights_count_rows_that_many_times():
    rng = np.random.default_rng(2)
    proba = rng.dirichlet(np.ones(3), size=300)
    y = rng.integers(0, 3, size=300)
    times = rng.integers(1, 4, size=300)
    repeated = np.repeat(np.arange(300), times)
    assert expected_calibration_error(proba, y, sample_weight=times) == pytest.approx(
        expected_calibration_error(proba[repeated], y[repeated]), abs=1e-12)
    assert expected_calibration_error(proba, y, sample_weight=np.ones(300)) == pytest.approx(
        expected_calibration_error(proba, y), abs=1e-12)
