"""Calibration: the threshold rules on known numbers, then end to end on the real models and workspace files."""

import json

import numpy as np
import pytest

from labelcascade import Classifier, Route
from labelcascade.agent import Policy
from labelcascade.agent.calibration import abstain_threshold, accept_threshold
from labelcascade.agent.candidates import smallest_m_for_recall

from ..conftest import BANKING_TASK, banking_messages


def test_accept_threshold_is_the_lowest_that_keeps_the_precision():
    certainty = np.array([0.99, 0.95, 0.9, 0.8, 0.6])
    correct = np.array([1, 1, 1, 0, 1], dtype=bool)
    assert accept_threshold(certainty, correct, 0.95) == 0.9
    assert accept_threshold(certainty, correct, 0.8) == 0.6
    # a threshold admits every text at least that sure: two texts tied at 0.9, one of them wrong
    assert accept_threshold(np.array([0.9, 0.9, 0.5]), np.array([1, 0, 1], dtype=bool), 0.9) == 1.0


def test_abstain_threshold_abstains_where_answers_are_more_often_wrong():
    proba = np.array([[0.9, 0.1], [0.8, 0.2], [0.55, 0.45], [0.52, 0.48], [0.51, 0.49]])
    truth = np.array([0, 0, 1, -1, -1])  # -1: the text has no label; abstaining on it is right
    assert abstain_threshold(proba, truth) == 0.8
    assert abstain_threshold(proba[:2], truth[:2]) == 0.0  # all right: never abstain


def test_candidate_count_keeps_the_true_label_for_98_percent():
    assert smallest_m_for_recall([0] * 98 + [5, 9], n_labels=77) == 2
    assert smallest_m_for_recall(list(range(100)), n_labels=77) == 77
    assert smallest_m_for_recall(list(range(50)) * 2, n_labels=77) == 49  # ranks 0..48 hold 98 of 100


@pytest.fixture(scope="module")
def calibrated(embedder, gemma, tmp_path_factory):
    path = tmp_path_factory.mktemp("calibrated") / "ws"
    classifier = Classifier(BANKING_TASK, workspace=path, embedder=embedder, engine=gemma,
                            policy=Policy(examples=2))
    texts, labels = banking_messages()
    report = classifier.calibrate(texts, labels, target_precision=0.999)
    return classifier, report


def test_calibration_chooses_measures_and_stores_the_policy(calibrated):
    classifier, report = calibrated
    texts, labels = banking_messages()
    assert report.dev_texts == len(texts)
    policy = report.policy
    certainty = classifier._fitted_cascade().certainty(classifier._fitted_cascade().probabilities(
        classifier.embedder.embed(texts)))
    sent = ~policy.accepts(certainty)
    assert sent.any()  # at a 0.999 precision target the 8-example fallback is not sure of every message
    covered = ~sent
    if covered.any():  # what the fallback answers alone is at least as precise as the target on the dev set
        predicted = classifier._fitted_cascade().probabilities(classifier.embedder.embed(texts)).argmax(axis=1)
        truth = np.array([classifier.task.label_names.index(label) for label in labels])
        assert (predicted[covered] == truth[covered]).mean() >= 0.999
    assert 2 <= policy.max_candidates <= len(classifier.classes_) and policy.llm_temperature > 0
    assert report.candidate_recall >= 0.98
    assert report.llm_share == pytest.approx(sent.mean() if policy.llm_weight > 0 else 0.0)
    if report.learned_precision is not None:  # the LLM labels it will learn from keep their own precision target
        assert report.learn_precision == 0.85 and report.learned_precision >= 0.85 and policy.learn_threshold < 1
    assert "| accept threshold | coverage | precision |" in report.table()
    assert any(row.threshold == pytest.approx(policy.accept_threshold) for row in report.coverage)

    settings = json.loads((classifier.workspace_path / "settings.json").read_text())
    assert Policy.model_validate(settings["policy"]) == policy == classifier.policy
    stored = json.loads((classifier.workspace_path / "calibration.json").read_text())
    assert stored["cascade_accuracy"] == report.cascade_accuracy


def test_a_reopened_classifier_routes_by_the_calibrated_policy(calibrated, embedder, gemma):
    classifier, report = calibrated
    reopened = Classifier.open(classifier.workspace_path, embedder=embedder, engine=gemma)
    assert reopened.policy == report.policy
    texts, _ = banking_messages()
    cascade = reopened._fitted_cascade()
    sure = report.policy.accepts(cascade.certainty(cascade.probabilities(embedder.embed(texts[:6]))))
    expected_llm = Route.LLM if report.policy.llm_weight > 0 else Route.FALLBACK
    assert [p.route for p in reopened.classify(texts[:6])] == [Route.FALLBACK if s else expected_llm for s in sure]


def test_a_budget_caps_the_share_sent_to_the_llm(embedder, gemma):
    classifier = Classifier(BANKING_TASK, embedder=embedder, engine=gemma, policy=Policy(examples=2))
    texts, labels = banking_messages()
    cascade = classifier._fitted_cascade()
    certainty = cascade.certainty(cascade.probabilities(embedder.embed(texts)))
    unbudgeted = classifier.calibrate(texts, labels, target_precision=1.0)
    budget = 0.5 * np.mean(~unbudgeted.policy.accepts(certainty))
    report = classifier.calibrate(texts, labels, target_precision=1.0, llm_budget=budget)
    assert np.mean(~report.policy.accepts(certainty)) <= budget
    assert report.policy.accept_threshold < unbudgeted.policy.accept_threshold
    assert any(f"at most {budget:.0%}" in note for note in report.notes)


def test_multi_label_calibration_fits_the_yes_no_questions(embedder, gemma):
    from labelcascade import Task

    task = Task.build({"name": "topics", "multi_label": True, "labels": [
        {"name": "sport", "examples": ["the team won the final", "the striker scored twice"]},
        {"name": "money", "examples": ["shares fell sharply", "the bank raised rates"]},
    ]})
    classifier = Classifier(task, embedder=embedder, engine=gemma, policy=Policy(examples=2))
    dev = ["the club was sold for a record fee", "the goalkeeper was fined", "inflation rose again",
           "the player signed a huge contract", "a new stadium tax was approved", "the runner broke the record"]
    truth = [("sport", "money"), ("sport", "money"), ("money",), ("sport", "money"), ("sport", "money"), ("sport",)]
    report = classifier.calibrate(dev, truth, target_precision=1.0)
    assert report.dev_texts == 6 and report.llm_accuracy_on_unsure is not None  # the LLM was asked about the unsure
    assert report.policy.llm_temperature > 0 and 0 <= report.policy.llm_weight <= 1
    assert report.candidate_recall is None  # multi-label asks per label instead of narrowing candidates
