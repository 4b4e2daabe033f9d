"""Tuning the student's body: the pairs, the schedule and the input checks (fast); tuning a real body is tested
through the session (tests/test_session.py), where it is used."""

from collections import Counter

import pytest

from labelcascade.fallback.body_tuning import (
    DEFAULT_MAX_SECONDS, MAX_ITERATIONS, TOKEN_BUDGET, contrastive_pairs, iterations_for, learning_rate_factor,
    pair_targets, planned_seconds, tune_body,
)


def test_every_text_gets_a_pair_of_its_label_and_one_of_another_in_every_iteration():
    labels = ["a", "a", "a", "b", "b", "c"]
    pairs = contrastive_pairs(labels, iterations=3, seed=1)
    for first, second, target in pairs:
        assert first != second and (labels[first] == labels[second]) == (target == 1.0)
    assert Counter(first for first, _, target in pairs if target == 0.0) == {i: 3 for i in range(6)}
    positives = Counter(first for first, _, target in pairs if target == 1.0)
    assert positives == {i: 3 for i in range(5)}  # the lone "c" text has no other text of its label
    assert contrastive_pairs(labels, 3, seed=1) == pairs != contrastive_pairs(labels, 3, seed=2)


def test_pairs_need_two_labels():
    with pytest.raises(ValueError, match="at least 2 labels"):
        contrastive_pairs(["a", "a"], iterations=1)


def test_the_token_budget_sets_the_iterations_within_bounds():
    assert iterations_for(100) == MAX_ITERATIONS
    assert iterations_for(10_000) == 2 and iterations_for(1_000_000) == 1
    assert iterations_for(2_000, token_budget=16_000) == 2


def test_the_default_time_limit_grows_only_for_a_plan_over_the_budget_at_one_iteration():
    assert planned_seconds(TOKEN_BUDGET // 2, iterations=1) == DEFAULT_MAX_SECONDS
    assert planned_seconds(5 * TOKEN_BUDGET // 4, iterations=2) == DEFAULT_MAX_SECONDS  # a rounding over the budget
    assert planned_seconds(4 * TOKEN_BUDGET, iterations=1) == 4 * DEFAULT_MAX_SECONDS  # many labels of long texts
    assert planned_seconds(2 * TOKEN_BUDGET, iterations=1, token_budget=2 * TOKEN_BUDGET) == DEFAULT_MAX_SECONDS


def test_the_learning_rate_warms_up_then_decays_by_steps_or_by_time_whichever_is_further():
    steps = 100
    assert learning_rate_factor(0, steps, 0.0) < learning_rate_factor(9, steps, 0.0) == 1.0
    assert learning_rate_factor(55, steps, 0.0) == pytest.approx(0.5)
    assert learning_rate_factor(55, steps, 0.9) == pytest.approx(0.1)  # the deadline is near: nearly done
    assert learning_rate_factor(99, steps, 0.0) == pytest.approx(1 / 90)
    assert learning_rate_factor(30, steps, 1.0) == 0.0


@pytest.mark.parametrize("texts, labels, seconds, message", [
    (["a", "b"], ["x"], 10, "2 texts but 1 labels"),
    (["a", "b"], [("x", "y"), ("x",)], 10, "single-label"),
    (["a", "b"], ["x", "y"], 0, "max_seconds must be positive"),
    (["a", "b"], ["x", "y"], float("nan"), "max_seconds must be positive"),
])
def test_what_cannot_be_tuned_is_refused_before_any_model_is_loaded(tmp_path, texts, labels, seconds, message):
    with pytest.raises(ValueError, match=message):
        tune_body(tmp_path / "no-model", texts, labels, tmp_path / "out", max_seconds=seconds)
    assert not (tmp_path / "out").exists()


def test_soft_pair_targets_are_the_chance_two_texts_share_a_label():
    """Distillation's targets (`tune_body(confidences=...)`): gold texts (confidence 1) give SetFit's 1 and 0; an LLM
    label right with confidence c, and otherwise any other label alike, pulls its pairs less far."""
    labels = ["a", "a", "b", "c"]
    pairs = [(0, 1, 1.0), (0, 2, 0.0), (0, 1, 1.0), (1, 2, 0.0), (2, 3, 0.0)]
    assert pair_targets(labels, [1.0, 1.0, 1.0, 1.0], pairs) == [pair[2] for pair in pairs]
    soft = pair_targets(labels, [1.0, 0.8, 0.5, 1.0], pairs)
    assert soft[0] == pytest.approx(0.8)  # gold "a" with an "a" that is right 80% of the time
    assert soft[1] == pytest.approx(0.25)  # gold "a" with a "b" that is "a" or "c" half the time: a is 0.25
    assert soft[3] == pytest.approx(0.8 * 0.25 + 0.1 * 0.5 + 0.1 * 0.25)  # both soft
    assert soft[4] == pytest.approx(0.25)
    assert all(0.0 <= target <= 1.0 for target in soft)


def test_weights_and_confidences_must_come_one_per_text(tmp_path):
    with pytest.raises(ValueError, match="2 texts but 1 weights"):
        tune_body(tmp_path / "no-model", ["a", "b"], ["x", "y"], tmp_path / "out", weights=[1.0])
    with pytest.raises(ValueError, match="2 texts but 3 confidences"):
        tune_body(tmp_path / "no-model", ["a", "b"], ["x", "y"], tmp_path / "out", confidences=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="weights must be finite"):
        tune_body(tmp_path / "no-model", ["a", "b"], ["x", "y"], tmp_path / "out", weights=[1.0, -1.0])
