"""The Python API end to end: real embedder, real FAISS + SQLite store, real fallback, real files."""

import numpy as np
import pytest

from labelcascade import Classifier, Prediction, Route, Source, TaskError
from labelcascade.fallback import NotFittedError
from labelcascade.retrieval import EmbedderMismatchError, SentenceTransformerEmbedder
from labelcascade.retrieval.embedders import default_model_dir
from labelcascade.workspace import WorkspaceError

from .conftest import BANKING_TASK, banking_messages, few_shot, held_out



@pytest.fixture(scope="module")
def banking(embedder, tmp_path_factory):
    return Classifier(BANKING_TASK, workspace=tmp_path_factory.mktemp("ws") / "banking", embedder=embedder, engine=None)


def test_task_seed_examples_train_a_useful_classifier(banking):
    texts, labels = banking_messages()
    predictions = banking.classify(texts)
    assert all(isinstance(p, Prediction) and p.route is Route.FALLBACK for p in predictions)
    assert np.mean([p.label == truth for p, truth in zip(predictions, labels, strict=True)]) >= 0.8
    assert len(banking.store) == 80 and {e.source for e in banking.store.examples()} == {Source.GOLD}


def test_one_text_gives_one_prediction_with_all_fields(banking):
    prediction = banking.classify("I forgot my PIN and typed it wrong three times, now it's blocked")
    assert prediction.label == "pin_blocked" == prediction.labels[0]
    assert set(prediction.probabilities) == set(banking.classes_)
    assert prediction.confidence == pytest.approx(max(prediction.probabilities.values()))
    assert prediction.evidence == [] and prediction.latency_ms > 0


def test_sklearn_contract_is_consistent_with_classify(banking):
    texts, _ = banking_messages()
    proba = banking.predict_proba(texts)
    assert proba.shape == (len(texts), 10) and np.allclose(proba.sum(axis=1), 1.0)
    assert list(banking.classes_) == banking.task.label_names
    assert list(banking.predict(texts)) == list(banking.classes_[proba.argmax(axis=1)])
    assert [p.label for p in banking.classify(texts)] == list(banking.predict(texts))


def test_fit_without_a_task_takes_the_labels_from_the_data(embedder):
    texts, labels = few_shot("sst2", 8)
    classifier = Classifier(embedder=embedder, engine=None).fit(texts, labels)
    assert list(classifier.classes_) == ["negative", "positive"]
    test_texts, test_labels = held_out("sst2", 100)
    assert (classifier.predict(test_texts) == np.array(test_labels)).mean() > 0.5


def test_fit_adds_examples_and_changes_answers(embedder, tmp_path):
    classifier = Classifier(BANKING_TASK, workspace=tmp_path / "ws", embedder=embedder, engine=None)
    text = "Can I get a virtual card for online shopping?"
    before = classifier.classify(text)
    classifier.fit([text, "I want a virtual card", "how do I get a disposable virtual card"], ["change_pin"] * 3)
    after = classifier.classify(text)
    assert len(classifier.store) == 83
    assert after.label == "change_pin" and after.probabilities["change_pin"] > before.probabilities["change_pin"]


def test_save_and_open_give_identical_answers(banking, embedder, tmp_path):
    texts, _ = banking_messages()
    expected = banking.predict_proba(texts)
    banking.save()
    reopened = Classifier.open(banking.workspace_path, embedder=embedder, engine=None)
    assert np.array_equal(reopened.predict_proba(texts), expected)
    assert [e.text for e in reopened.store.examples()] == [e.text for e in banking.store.examples()]


def test_a_temporary_classifier_saves_to_a_new_folder(embedder, tmp_path):
    classifier = Classifier(BANKING_TASK, embedder=embedder, engine=None)
    with pytest.raises(ValueError, match="needs a path"):
        classifier.save()
    classifier.save(tmp_path / "kept")
    assert classifier.workspace_path == tmp_path / "kept"
    assert Classifier.open(tmp_path / "kept", embedder=embedder, engine=None).classify("my card is lost").label == "lost_or_stolen_card"
    with pytest.raises(FileExistsError, match="not empty"):
        classifier.save(tmp_path / "kept" / "..")


def test_opening_with_another_embedder_is_refused(banking, tmp_path):
    banking.save()
    other = SentenceTransformerEmbedder(default_model_dir(), name="another-model")
    with pytest.raises(EmbedderMismatchError, match="another-model"):
        Classifier.open(banking.workspace_path, embedder=other)


def test_mistakes_get_errors_that_say_what_to_do(embedder, tmp_path):
    with pytest.raises(NotFittedError, match="fit"):
        Classifier(embedder=embedder, engine=None).classify("hello")
    classifier = Classifier(BANKING_TASK, embedder=embedder, engine=None)
    with pytest.raises(TaskError, match="row 1: unknown label 'weather'"):
        classifier.fit(["my card is lost", "is it raining"], ["lost_or_stolen_card", "weather"])
    with pytest.raises(ValueError, match="row 0: text is empty"):
        classifier.fit(["   "], ["change_pin"])
    with pytest.raises(ValueError, match="2 texts but 1 labels"):
        classifier.fit(["a", "b"], ["change_pin"])
    with pytest.raises(WorkspaceError, match="not a labelcascade workspace"):
        Classifier.open(tmp_path)
    assert len(classifier.store) == 80  # refused input stored nothing
