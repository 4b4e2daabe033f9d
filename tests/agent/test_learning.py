"""The learner: LLM answers become examples, gold is never overwritten, retraining every N, pending survives restarts."""

import time

import numpy as np

from labelcascade.agent import Learner
from labelcascade.records import Source
from labelcascade.retrieval import ExampleStore


def make(embedder, tmp_path, saved: list):
    store = ExampleStore(tmp_path / "store", embedder_id=embedder.id, dim=embedder.dim)
    texts = ["my card is lost", "I lost my card", "my card has not arrived", "where is my new card"]
    labels = ["lost", "lost", "arrival", "arrival"]
    store.add(texts, labels, embedder.embed(texts))
    return store, Learner(store, multi_label=False, C=1.0, save=saved.append)


def test_gold_is_never_overwritten_by_an_llm_label(embedder, tmp_path):
    saved = []
    store, learner = make(embedder, tmp_path, saved)
    text = "my card is lost"
    assert learner.learn([text], [("arrival",)], [0.99], embedder.embed([text]), retrain_every=1) is None
    example = next(e for e in store.examples() if e.text == text)
    assert example.labels == ("lost",) and example.source is Source.GOLD
    assert learner.pending == 0 and not saved  # not a new example, so nothing to retrain for


def test_retrains_after_every_n_new_llm_examples(embedder, tmp_path):
    saved = []
    store, learner = make(embedder, tmp_path, saved)
    texts = ["someone stole my card", "the card never came", "card missing from my wallet"]
    labels = [("lost",), ("arrival",), ("lost",)]
    vectors = embedder.embed(texts)
    assert learner.learn(texts[:2], labels[:2], [0.95, 0.9], vectors[:2], retrain_every=3) is None
    assert learner.pending == 2 and store.count(Source.LLM) == 2
    model = learner.learn(texts[2:], labels[2:], [0.97], vectors[2:], retrain_every=3)
    assert model is not None and saved == [model] and learner.pending == 0
    assert list(model.classes_) == ["arrival", "lost"]


def test_pending_llm_examples_are_counted_again_after_a_restart(embedder, tmp_path):
    saved = []
    store, learner = make(embedder, tmp_path, saved)
    trained_at = time.time()
    learner.learn(["card gone"], [("lost",)], [0.9], embedder.embed(["card gone"]), retrain_every=10)
    store.close()
    reopened = ExampleStore(tmp_path / "store", embedder_id=embedder.id, dim=embedder.dim)
    assert Learner(reopened, multi_label=False, C=1.0, save=saved.append, trained_at=trained_at).pending == 1
    assert Learner(reopened, multi_label=False, C=1.0, save=saved.append, trained_at=time.time()).pending == 0


def test_a_review_outranks_the_llm_and_is_not_undone_by_it(embedder, tmp_path):
    saved = []
    store, learner = make(embedder, tmp_path, saved)
    text, vector = "the card I ordered is missing", embedder.embed(["the card I ordered is missing"])
    learner.learn([text], [("lost",)], [0.9], vector, retrain_every=10)
    store.add([text], [("arrival",)], vector, source=Source.REVIEW)  # a person corrects the LLM
    learner.learn([text], [("lost",)], [0.99], vector, retrain_every=10)  # the LLM says it again
    example = next(e for e in store.examples() if e.text == text)
    assert example.labels == ("arrival",) and example.source is Source.REVIEW


def test_held_out_probabilities_come_from_models_that_never_saw_the_text(embedder, tmp_path):
    """Calibrating on the training texts needs the fallback's answer on each as if it were new: the model trained on
    every text is right on all of them; out of fold it gets some wrong, as on texts it has not seen."""
    from ..conftest import few_shot

    texts, labels = few_shot("sst2", 8)
    store = ExampleStore(tmp_path / "store", embedder_id=embedder.id, dim=embedder.dim)
    store.add(texts, labels, embedder.embed(texts))
    llm_text = "a warm, funny and wise film"
    store.add([llm_text], ["positive"], embedder.embed([llm_text]), source=Source.LLM, confidence=0.9)
    snapshot = Learner(store, multi_label=False, C=1.0, save=lambda model: None).begin()
    rows = np.array([i for i, source in enumerate(snapshot.sources) if source is Source.GOLD])
    assert len(rows) == 16 and snapshot.texts[int(np.setdiff1d(np.arange(17), rows)[0])] == llm_text
    truth = np.array([["negative", "positive"].index(snapshot.y[i]) for i in rows])
    in_sample = snapshot.fit().model.predict_proba(snapshot.vectors[rows])
    held_out = snapshot.held_out_probabilities(rows, ["negative", "positive"], 4)
    assert held_out.shape == (16, 2) and np.allclose(held_out.sum(axis=1), 1.0)
    assert (in_sample.argmax(axis=1) == truth).mean() == 1.0
    assert (held_out.argmax(axis=1) == truth).mean() < 1.0
    # columns follow the labels asked for, whatever order the models keep
    assert np.array_equal(snapshot.held_out_probabilities(rows, ["positive", "negative"], 4), held_out[:, ::-1])
