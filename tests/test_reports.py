"""Evaluation reports end to end: real embedder, store and fallback; real files, decoded back as images.

The numbers are checked against values recomputed here from the session's own predictions; the LLM route uses
the real embedded LLM, whose answers are deterministic, so the replayed accuracy-against-LLM-share curve can be
checked point by point.
"""

import re

import numpy as np
import pytest
from matplotlib.image import imread

from labelcascade import Session, Route, Task
from labelcascade.agent import Policy
from labelcascade.reports import evaluate

from .conftest import BANKING_TASK, banking_dev, banking_messages

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOTS = ("confusion_png", "reliability_png", "llm_share_png")


def assert_png(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    return image


def test_report_files_and_numbers_match_the_predictions(banking, tmp_path):
    texts, labels = banking_messages()
    out = tmp_path / "new" / "eval"
    report = evaluate(banking, texts, labels, out, title="Banking check")

    predictions = banking.classify(texts)
    right = np.array([p.label == truth for p, truth in zip(predictions, labels, strict=True)])
    assert report.accuracy == pytest.approx(right.mean()) == pytest.approx(report.fallback_accuracy)
    assert report.texts == 40 and report.llm_share == 0 and report.abstained == 0 and report.engine is None
    assert {r.route: r.answers for r in report.routes} == {Route.FALLBACK: 40, Route.LLM: 0, Route.DEGRADED: 0, Route.ABSTAIN: 0}
    assert [s.label for s in report.labels] == banking.labels
    assert sum(s.support for s in report.labels) == 40
    assert report.coverage[0].threshold == 0 and report.coverage[0].precision == pytest.approx(right.mean())
    # nothing was sent to the LLM: the curve is the one measured point, which is the fallback alone
    assert [(p.llm_share, p.accuracy) for p in report.llm_curve] == [(0.0, pytest.approx(right.mean()))]

    assert report.report_md == out / "report.md"
    assert sorted(path.name for path in out.iterdir()) == ["confusion.png", "llm_share.png", "reliability.png", "report.md"]
    for plot in PLOTS:
        assert_png(getattr(report, plot))
    md = report.report_md.read_text()
    assert md.startswith("# Banking check\n")
    assert f"| accuracy | {right.mean():.3f} |" in md
    for label in banking.labels:
        assert re.search(rf"^\| {label} \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \| \d+ \|$", md, re.MULTILINE), label
    assert "| confidence at least | coverage | accuracy |" in md and "| 0.90 |" in md
    for plot in PLOTS:
        assert f"]({getattr(report, plot).name})" in md
    assert report.stored == 0 and "Read with care" not in md


def test_a_report_on_texts_the_fallback_was_trained_on_says_so(banking, tmp_path):
    seeds = [(text + " ", label.name) for label in banking.task.labels for text in label.examples][:5]
    texts, labels = banking_messages()
    report = evaluate(banking, [*[t for t, _ in seeds], *texts[:5]], [*[l for _, l in seeds], *labels[:5]], tmp_path)
    assert report.stored == 5 and "5 of them stored examples (accuracy overstated)" in report.summary()
    assert "**Read with care:** 5 of these texts are stored examples" in report.report_md.read_text()


def test_the_llm_curve_replays_the_run_from_no_text_sent_to_the_share_sent(embedder, gemma, banking, tmp_path):
    texts, labels = banking_messages()
    session = Session.create(BANKING_TASK, embedder=embedder, engine=gemma, policy=Policy(accept_threshold=0.0))
    fallback = session.classify(texts)  # accepting every answer: the fallback's answers
    session.set_policy(Policy(accept_threshold=0.9, examples=2, llm_weight=1.0, learn_threshold=0.0, retrain_every=1))
    stored = len(session.store)
    report = evaluate(session, texts, labels, tmp_path)
    final = session.classify(texts, learn=False)  # the real LLM is deterministic: the same answers again

    certainty = np.array([p.confidence for p in fallback])
    fallback_right = np.array([p.label == truth for p, truth in zip(fallback, labels, strict=True)])
    final_right = np.array([p.label == truth for p, truth in zip(final, labels, strict=True)])
    sent = certainty < 0.9
    assert 0 < sent.sum() < 40 and [p.route is Route.LLM for p in final] == list(sent)
    assert report.llm_share == pytest.approx(sent.mean())
    assert {r.route: r.answers for r in report.routes}[Route.LLM] == sent.sum()
    assert report.accuracy == pytest.approx(final_right.mean())
    assert report.fallback_accuracy == pytest.approx(fallback_right.mean())
    assert len(session.store) == stored  # evaluating never learns from the test texts

    curve = report.llm_curve
    assert (curve[0].llm_share, curve[0].accuracy) == (0.0, pytest.approx(fallback_right.mean()))
    assert (curve[-1].llm_share, curve[-1].accuracy) == (pytest.approx(sent.mean()), pytest.approx(report.accuracy))
    assert len(curve) == sent.sum() + 1 and np.all(np.diff([p.llm_share for p in curve]) > 0)
    for point in curve:  # the texts under the threshold take the cascade's answer, the others the fallback's
        asked = certainty < point.accept_threshold
        assert point.accuracy == pytest.approx(np.mean(np.where(asked, final_right, fallback_right)))
    assert_png(report.llm_share_png)
    session.close()


def test_out_of_scope_texts_get_their_own_scores(embedder, tmp_path):
    """A chat router's test set: texts with no label are measured apart (answered none or not), beside the accuracy
    on the texts in scope and the share of those wrongly answered none."""
    session = Session.create(BANKING_TASK, embedder=embedder, engine=None)
    session.calibrate(*banking_dev())  # its out-of-scope texts set the abstain threshold
    texts, labels = banking_messages()
    texts, labels = texts + ["will it rain tomorrow?", "order me a pizza"], labels + [None, ""]
    report = evaluate(session, texts, labels, tmp_path)
    answers = session.classify(texts, learn=False)
    none = [a.label is None for a in answers]
    assert report.out_of_scope == 2 and report.out_of_scope_recall == pytest.approx(np.mean(none[-2:]))
    assert report.in_scope_accuracy == pytest.approx(np.mean([a.label == t for a, t in zip(answers[:-2], labels, strict=False)]))
    assert report.in_scope_rejected == pytest.approx(np.mean(none[:-2]))
    assert "out of scope: 2 texts" in report.summary()
    assert f"| in-scope accuracy | {report.in_scope_accuracy:.3f} |" in report.report_md.read_text()
    plain = evaluate(session, texts[:-2], labels[:-2], tmp_path / "plain")
    assert plain.out_of_scope == 0 and plain.out_of_scope_recall is None and "out of scope" not in plain.summary()


def test_multi_label_task_gets_a_report(embedder, tmp_path):
    task = Task.build({"name": "topics", "multi_label": True, "labels": [
        {"name": "sport", "examples": ["the team won the final", "the striker scored twice"]},
        {"name": "money", "examples": ["shares fell sharply", "the bank raised rates"]},
        {"name": "weather", "examples": ["heavy rain is expected", "a heatwave hit the city"]},
    ]})
    session = Session.create(task, embedder=embedder, engine=None)
    texts = ["the club was sold for a record fee", "the goalkeeper was fined", "inflation rose again",
             "storms delayed the match", "the runner broke the record", "snow closed the stock exchange"]
    truth = [("sport", "money"), ("sport", "money"), "money", ["sport", "weather"], ["sport"], ("weather", "money")]
    report = evaluate(session, texts, truth, tmp_path)

    answers = [set(p.labels) for p in session.classify(texts)]
    exact = np.mean([a == ({t} if isinstance(t, str) else set(t)) for a, t in zip(answers, truth, strict=True)])
    assert report.multi_label and report.accuracy == pytest.approx(exact)
    assert {s.label: s.support for s in report.labels} == {"sport": 4, "money": 4, "weather": 2}
    assert 0 <= report.calibration_error <= 1
    for plot in PLOTS:
        assert_png(getattr(report, plot))
    assert "exact match" in report.report_md.read_text()
    session.close()


def test_bad_input_is_refused_naming_the_row(banking, embedder, tmp_path):
    texts, labels = banking_messages()
    with pytest.raises(ValueError, match="40 texts and 39 labels"):
        evaluate(banking, texts, labels[:-1], tmp_path)
    with pytest.raises(ValueError, match="row 2: unknown label 'weather'"):
        evaluate(banking, texts[:3], [labels[0], labels[1], "weather"], tmp_path)
    closed = Session.create(Task.from_yaml(BANKING_TASK).model_copy(update={"allow_abstain": False}),
                            embedder=embedder, engine=None)
    with pytest.raises(ValueError, match="row 1: no label, but the task does not allow abstaining"):
        evaluate(closed, texts[:2], [labels[0], None], tmp_path)
    with pytest.raises(ValueError, match="row 0: text is empty"):
        evaluate(banking, ["  ", texts[1]], labels[:2], tmp_path)
    with pytest.raises(ValueError, match="got 0 texts"):
        evaluate(banking, [], [], tmp_path)
    assert not any(tmp_path.iterdir())  # nothing written for input that was refused


def test_77_labels_give_a_confusion_matrix_with_every_label_named(embedder, tmp_path):
    names = [f"intent_{i:02d}_with_a_long_name" for i in range(77)]
    seeds = ["question number {i} about topic {n}", "topic {n}: question {i}", "about {n}, question {i}"]
    task = Task.build({"name": "many", "labels": [
        {"name": n, "examples": [seed.format(i=i, n=n) for seed in seeds]} for i, n in enumerate(names)
    ]})
    session = Session.create(task, embedder=embedder, engine=None)
    texts = [f"a question number {i} about topic {n}" for i, n in enumerate(names)]
    report = evaluate(session, texts, names, tmp_path)
    height, width, _ = assert_png(report.confusion_png).shape
    assert height >= 77 * 20 and width >= 77 * 20  # at least 20 pixels per label row: tick labels do not overlap
    assert len(report.labels) == 77
    session.close()
