"""The learner: LLM answers become examples, gold is never overwritten, retraining every N, pending survives restarts."""

import time

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
