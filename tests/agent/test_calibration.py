"""Calibration: the threshold rules on known numbers, then end to end on the real models and workspace files."""

import json

import numpy as np
import pytest

from labelcascade import Session, Route
from labelcascade.agent import Policy
from labelcascade.agent.calibration import DevSet, abstain_threshold, accept_threshold, choose_policy
from labelcascade.agent.candidates import smallest_m_for_recall
from labelcascade.agent.policy import CACHED_LAYOUT

from labelcascade.task import Task

from ..conftest import BANKING_TASK, banking_dev, banking_messages, few_shot, held_out


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
    session = Session.create(BANKING_TASK, workspace=path, embedder=embedder, engine=gemma,
                            policy=Policy(examples=2))
    texts, labels = banking_messages()
    report = session.calibrate(texts, labels, target_precision=0.999)
    return session, report


def test_calibration_chooses_measures_and_stores_the_policy(calibrated):
    session, report = calibrated
    texts, labels = banking_messages()
    assert report.dev_texts == len(texts)
    policy = report.policy
    cascade = session.cascade
    proba = cascade.probabilities(session.embedder.embed(texts), texts)
    sent = ~policy.accepts(cascade.certainty(proba))
    truth = np.array([session.task.label_names.index(label) for label in labels])
    fallback_right = proba.argmax(axis=1) == truth
    # the fallback answers alone where it keeps the target precision, or where the LLM would add (almost) nothing:
    # no accept threshold and weight do better on the dev set than this choice plus the tolerance
    dev = DevSet.load(session.path / "calibration.npz")
    assert dev.vectors.shape == (len(texts), session.embedder.dim) and (dev.truth == truth).all()
    assert dev.texts == texts  # for a fallback that reads their n-grams when the policy is chosen again
    assert np.allclose(dev.llm.sum(axis=1), 1.0) and dev.temperature == policy.llm_temperature
    if (~sent).any() and fallback_right[~sent].mean() < 0.999:
        everything_sent = max(cascade.pool(proba, dev.llm, w).argmax(axis=1).__eq__(truth).mean()
                              for w in np.arange(0.1, 1.01, 0.1))
        assert report.cascade_accuracy >= everything_sent - report.tolerance - 1e-9
    assert 2 <= policy.max_candidates <= len(session.labels) and policy.llm_temperature > 0
    assert report.candidate_recall >= 0.98
    assert report.llm_share == pytest.approx(sent.mean() if policy.llm_weight > 0 else 0.0)
    if report.learned_precision is not None:  # the LLM labels it will learn from keep their own precision target
        assert report.learn_precision == 0.85 and report.learned_precision >= 0.85 and policy.learn_threshold < 1
    assert "| accept threshold | coverage | precision |" in report.table()
    assert any(row.threshold == pytest.approx(policy.accept_threshold) for row in report.coverage)

    settings = json.loads((session.path / "settings.json").read_text())
    assert Policy.model_validate(settings["policy"]) == policy == session.policy
    stored = json.loads((session.path / "calibration.json").read_text())
    assert stored["cascade_accuracy"] == report.cascade_accuracy


def test_a_retrain_keeps_the_policy_and_a_new_label_has_it_chosen_again_without_asking_the_llm(embedder, gemma,
                                                                                                tmp_path):
    """A retrain of the fallback alone keeps the calibrated policy (the retrained fallback's probabilities are
    calibrated again, so its thresholds keep their meaning; choosing again on the dev set after learning's retrains
    lost accuracy on the learning streams); a new label has it chosen again on the dev set, without the LLM."""
    session = Session.create(BANKING_TASK, workspace=tmp_path / "ws", embedder=embedder, engine=gemma,
                            policy=Policy(examples=2))
    texts, labels = banking_messages()
    first = session.calibrate(texts[:20], labels[:20])
    asked, fallback = gemma.stats.prompts, session.cascade.fallback
    session.add_examples(texts[20:], labels[20:], retrain=True)  # more gold examples: a new fallback, the same policy
    assert session.cascade.fallback is not fallback and gemma.stats.prompts == asked
    assert session.policy == first.policy and session.calibration().retrains == first.retrains == 0

    # a new label: the policy is chosen again on the dev set widened by a column the LLM never scored, no LLM call
    session.add_label("travel_notice", ["I'm going abroad next week, do I need to tell you?",
                                        "how do I set a travel notice on my card"])
    assert gemma.stats.prompts == asked
    dev = DevSet.load(tmp_path / "ws" / "calibration.npz")
    assert dev.llm.shape == (20, 11) and not dev.llm[:, -1].any() and dev.truth.max() < 10
    again = session.calibration()
    assert again.retrains == 1 and "'travel_notice' was added after calibration" in again.warnings[-1]
    # calibrate's own rule for the new fallback, sending at most the share of dev texts sent before
    expected = choose_policy(session.cascade, dev, llm_budget=first.llm_share)
    assert again.llm_budget == first.llm_share and again.llm_share <= first.llm_share
    assert session.policy == expected.policy == again.policy

    # learning's own retrains keep the policy too
    learning = session.policy.model_copy(update={"accept_threshold": 1.0, "llm_weight": 0.5, "learn_threshold": 0.0,
                                                 "retrain_every": 2})
    session.set_policy(learning)
    fallback = session.cascade.fallback
    session.classify(texts[:3])  # the LLM answers all three (dev texts, not stored): learned, retrained after two
    assert session.cascade.fallback is not fallback and session.store.count("llm") == 3
    assert session.policy == learning and session.calibration().retrains == 1


def with_llm_answers(session, texts, labels, llm_answers) -> DevSet:
    """A dev set whose LLM answered `llm_answers` with certainty: the rule on known LLM behaviour, no engine."""
    names = session.labels
    llm = np.zeros((len(texts), len(names)))
    llm[np.arange(len(texts)), [names.index(label) for label in llm_answers]] = 1.0
    return DevSet(session.embedder.embed(texts), np.array([names.index(label) for label in labels]), llm, 1.0, 5)


def test_an_llm_that_agrees_with_the_fallback_is_sent_nothing(embedder):
    session = Session.create(BANKING_TASK, embedder=embedder, engine=None)
    texts, labels = banking_messages()
    fallback_answers = [p.label for p in session.classify(texts, learn=False)]
    report = choose_policy(session.cascade, with_llm_answers(session, texts, labels, fallback_answers))
    assert report.policy.llm_weight == 0 and report.llm_share == 0
    assert report.cascade_accuracy == report.fallback_accuracy


def test_a_perfect_llm_gets_the_unsure_texts_within_the_budget(embedder):
    session = Session.create(BANKING_TASK, embedder=embedder, engine=None)
    texts, labels = banking_messages()
    dev = with_llm_answers(session, texts, labels, labels)
    cascade = session.cascade
    report = choose_policy(cascade, dev, target_precision=1.0, tolerance=0.0)
    assert report.fallback_accuracy < 1 and report.cascade_accuracy == 1.0  # every wrong answer went to the LLM
    assert 0 < report.llm_share < 1 and report.policy.llm_weight > 0
    budget = report.llm_share / 2
    capped = choose_policy(cascade, dev, target_precision=1.0, tolerance=0.0, llm_budget=budget)
    assert capped.llm_share <= budget and capped.cascade_accuracy < 1.0
    assert any(f"at most {budget:.0%}" in note for note in capped.notes)
    # after a retrain the calibrated accuracy is kept and the rest saved: a floor the fallback reaches sends nothing
    floored = choose_policy(cascade, dev, target_precision=1.0, tolerance=0.0, accuracy_floor=report.fallback_accuracy)
    assert floored.llm_share == 0 and floored.accuracy_floor == report.fallback_accuracy
    assert report.accuracy_floor == 1.0  # at calibration: the best reachable, every wrong answer sent to the LLM


def test_out_of_scope_dev_texts_set_the_abstain_threshold_and_are_measured(embedder):
    """A chat router's dev set: texts with no label teach the abstain threshold, and the report says how the chosen
    policy treats them, numbers that the session's own answers afterwards must match."""
    session = Session.create(BANKING_TASK, embedder=embedder, engine=None)
    texts, labels = banking_dev()
    report = session.calibrate(texts, labels)
    assert report.policy.abstain_threshold > 0 and report.warnings == []
    answers = session.classify(texts, learn=False)
    out_of_scope = [a for a, label in zip(answers, labels, strict=True) if label is None]
    in_scope = [(a, label) for a, label in zip(answers, labels, strict=True) if label is not None]
    assert report.out_of_scope_texts == len(out_of_scope) == 10
    assert report.out_of_scope_recall == pytest.approx(np.mean([a.route is Route.ABSTAIN for a in out_of_scope]))
    assert report.out_of_scope_recall >= 0.8  # the weather, jokes and alarms are far from every intent
    assert report.in_scope_accuracy == pytest.approx(np.mean([a.label == label for a, label in in_scope]))
    assert "out of scope: 10 dev texts with no label" in report.table()


def test_calibrating_on_too_few_dev_texts_warns(embedder, caplog):
    """A threshold chosen on a handful of texts was reported as if it were measured (dev precision 1.000 from one
    text): calibrate now says what rests on too few."""
    session = Session.create(BANKING_TASK, embedder=embedder, engine=None)
    texts, labels = banking_dev()
    with caplog.at_level("WARNING", logger="labelcascade.session"):
        report = session.calibrate(texts[:8] + texts[-2:], labels[:8] + labels[-2:])
    assert any("only 10 dev texts" in warning for warning in report.warnings)
    assert any("rests on 2 dev texts with no label" in warning for warning in report.warnings)
    assert [r.getMessage() for r in caplog.records] == [f"calibrate: {w}" for w in report.warnings]
    # with the LLM: its weight chosen on few unsure texts is named as such
    texts, labels = banking_messages()
    dev = with_llm_answers(session, texts, labels, labels)
    perfect = choose_policy(session.cascade, dev, target_precision=1.0, tolerance=0.0)
    unsure = round(perfect.llm_share * len(texts))
    assert 0 < unsure < 20 and any(f"rest on the {unsure} dev texts" in w for w in perfect.warnings)


def test_label_offsets_fitted_without_some_labels_say_which(embedder):
    """Label offsets fitted on dev texts of a few labels (a file sorted by label, cut short) teach the LLM to avoid the
    labels left out: calibrate names them, and says nothing when every label has dev texts."""
    session = Session.create(BANKING_TASK, embedder=embedder, engine=None)
    texts, labels = banking_messages()
    left_out = sorted(set(labels))[0]
    kept = [i for i, label in enumerate(labels) if label != left_out]
    partial = with_llm_answers(session, [texts[i] for i in kept], [labels[i] for i in kept], [labels[i] for i in kept])
    full = with_llm_answers(session, texts, labels, labels)
    for dev in (partial, full):
        dev.label_bias = np.zeros(len(session.labels))  # offsets kept, as label_bias.choose keeps them where they help
    missing = [name for name in session.labels if name not in {labels[i] for i in kept}]
    warned = [w for w in choose_policy(session.cascade, partial).warnings if "label offsets were fitted" in w]
    assert len(warned) == 1 and f"none of {len(missing)} of the {len(session.labels)} labels" in warned[0]
    assert repr(left_out) in warned[0]
    assert not [w for w in choose_policy(session.cascade, full).warnings if "label offsets" in w]
    partial.label_bias = None  # no offsets: nothing leans away from the labels left out
    assert not [w for w in choose_policy(session.cascade, partial).warnings if "label offsets" in w]


def test_label_offsets_undo_the_llms_lean_toward_spam(embedder, gemma, tmp_path):
    """Gemma 3 270M answers "spam" to most of sms_spam whatever the text: calibrate fits per-label offsets on the dev
    texts' scores (no more LLM calls), keeps them because they raise the held-out dev accuracy, and the workspace
    answers with them. Zero-shot keeps the test quick; the few-shot effect is measured by bench/llm.py."""
    texts, labels = few_shot("sms_spam", 8)
    dev_texts, dev_labels = held_out("sms_spam", 60)
    task = Task.from_labels(["ham", "spam"], name="sms")
    with Session.create(task, workspace=tmp_path / "ws", embedder=embedder, engine=gemma,
                        policy=Policy(examples=0)) as session:
        session.add_examples(texts, labels, retrain=True)
        report = session.calibrate(dev_texts, dev_labels)
        dev = DevSet.load(session.path / "calibration.npz")
    bias = report.policy.llm_label_bias
    assert bias["ham"] > bias["spam"] and dev.bias_by_label(task.label_names) == bias
    without, with_offsets = dev.bias_accuracy
    assert without < 0.5 and with_offsets >= 0.8  # held out: the offsets were fitted on the other dev folds
    assert any("label offsets on" in note for note in report.notes)
    assert not [w for w in report.warnings if "label offsets were fitted" in w]  # both labels have dev texts
    truth = np.array([task.label_names.index(label) for label in dev_labels])
    assert (dev.llm.argmax(axis=1) == truth).mean() >= 0.8  # the LLM's dev answers, with its offsets
    with Session.open(tmp_path / "ws", embedder=embedder, engine=gemma) as reopened:
        assert reopened.policy.llm_label_bias == bias


def test_calibrate_compares_prompt_layouts_and_keeps_the_best(embedder, gemma, tmp_path):
    """Each layout (static examples per label, retrieved examples) is measured on the dev texts; the kept one has the
    best calibrated dev accuracy, and the workspace's dev set and policy are the ones measured with it."""
    texts, labels = few_shot("sst2", 4)
    dev_texts, dev_labels = held_out("sst2", 24)
    task = Task.from_labels(["negative", "positive"], name="sentiment")
    with Session.create(task, workspace=tmp_path / "ws", embedder=embedder, engine=gemma,
                        policy=Policy(accept_threshold=1.0)) as session:
        session.add_examples(texts, labels, retrain=True)
        report = session.calibrate(dev_texts, dev_labels, layouts=[(0, 0), (2, 1)])
        lines = [note for note in report.notes if note.startswith("layout ")]
        accuracies = [float(line.split("cascade dev accuracy ")[1].split(",")[0]) for line in lines]
        assert len(lines) == 2 and report.cascade_accuracy == pytest.approx(max(accuracies), abs=5e-4)
        kept = (report.policy.static_examples, report.policy.examples)
        assert kept == [(0, 0), (2, 1)][accuracies.index(max(accuracies))]
        assert (session.policy.static_examples, session.policy.examples) == kept
        again = choose_policy(session.cascade, DevSet.load(session.path / "calibration.npz"))
        assert again.cascade_accuracy == pytest.approx(report.cascade_accuracy)


def test_calibrate_compares_the_policys_layout_with_the_cached_one_unless_told(embedder, gemma, tmp_path):
    """By default calibrate tries the policy's own layout and CACHED_LAYOUT (the own one kept on a tie); one layout
    given is kept without comparing; a workspace without an LLM, or whose cached static part would leave a label
    out, compares nothing."""
    texts, labels = few_shot("sst2", 4)
    dev_texts, dev_labels = held_out("sst2", 16)
    task = Task.from_labels(["negative", "positive"], name="sentiment")
    with Session.create(task, workspace=tmp_path / "ws", embedder=embedder, engine=gemma,
                        policy=Policy(accept_threshold=1.0, examples=3)) as session:
        session.add_examples(texts, labels, retrain=True)
        report = session.calibrate(dev_texts, dev_labels)
        lines = [note for note in report.notes if note.startswith("layout ")]
        assert [line.split(":")[0] for line in lines] == [
            "layout 0 static examples per label + 3 retrieved",
            f"layout {CACHED_LAYOUT[0]} static examples per label + {CACHED_LAYOUT[1]} retrieved"]
        accuracies = [float(line.split("cascade dev accuracy ")[1].split(",")[0]) for line in lines]
        kept = (0, 3) if accuracies[0] >= accuracies[1] else CACHED_LAYOUT
        assert (session.policy.static_examples, session.policy.examples) == kept
        one = session.calibrate(dev_texts, dev_labels, layouts=[(0, 3)])
        assert not [note for note in one.notes if note.startswith("layout ")]
        assert (session.policy.static_examples, session.policy.examples) == (0, 3)
    with Session.create(task, workspace=tmp_path / "alone", embedder=embedder, engine=None) as alone:
        alone.add_examples(texts, labels, retrain=True)
        assert not [note for note in alone.calibrate(dev_texts, dev_labels).notes if note.startswith("layout ")]
    # A static part that would leave a label out (no example of "neutral" yet) is not tried.
    three = Task.from_labels(["negative", "positive", "neutral"], name="sentiment")
    with Session.create(three, workspace=tmp_path / "three", embedder=embedder, engine=gemma) as partial:
        partial.add_examples(texts, labels, retrain=True)
        assert not [note for note in partial.calibrate(dev_texts, dev_labels).notes if note.startswith("layout ")]


def test_a_reopened_classifier_routes_by_the_calibrated_policy(calibrated, embedder, gemma):
    session, report = calibrated
    reopened = Session.open(session.path, embedder=embedder, engine=gemma)
    assert reopened.policy == report.policy
    texts, _ = banking_messages()
    cascade = reopened.cascade
    sure = report.policy.accepts(cascade.certainty(cascade.probabilities(embedder.embed(texts[:6]))))
    expected_llm = Route.LLM if report.policy.llm_weight > 0 else Route.FALLBACK
    assert [p.route for p in reopened.classify(texts[:6])] == [Route.FALLBACK if s else expected_llm for s in sure]


def test_multi_label_calibration_fits_the_yes_no_questions(embedder, gemma):
    from labelcascade import Task

    task = Task.build({"name": "topics", "multi_label": True, "labels": [
        {"name": "sport", "examples": ["the team won the final", "the striker scored twice"]},
        {"name": "money", "examples": ["shares fell sharply", "the bank raised rates"]},
    ]})
    session = Session.create(task, embedder=embedder, engine=gemma, policy=Policy(examples=2))
    dev = ["the club was sold for a record fee", "the goalkeeper was fined", "inflation rose again",
           "the player signed a huge contract", "a new stadium tax was approved", "the runner broke the record"]
    truth = [("sport", "money"), ("sport", "money"), ("money",), ("sport", "money"), ("sport", "money"), ("sport",)]
    report = session.calibrate(dev, truth, target_precision=1.0)
    assert report.dev_texts == 6 and report.llm_accuracy_on_unsure is not None  # the LLM was asked about the unsure
    assert report.policy.llm_temperature > 0 and 0 <= report.policy.llm_weight <= 1
    assert report.candidate_recall is None  # multi-label asks per label instead of narrowing candidates


def test_a_damaged_dev_set_file_is_a_clear_error(embedder, tmp_path):
    session = Session.create(BANKING_TASK, embedder=embedder, engine=None)
    texts, labels = banking_messages()
    path = tmp_path / "calibration.npz"
    with_llm_answers(session, texts, labels, labels).save(path)
    assert DevSet.load(path).llm.shape == (len(texts), len(session.labels))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="calibration.npz: damaged calibration data"):
        DevSet.load(path)
