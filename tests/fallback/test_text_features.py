"""The sparse tier: TF-IDF n-grams of the texts beside their vectors, on real embeddings of real datasets."""

import json

import numpy as np
import pytest

from labelcascade.fallback import LinearSVMClassifier
from labelcascade.fallback.text_features import MAX_NGRAMS, TextNgrams, analyzer_for
from labelcascade.session import Session
from labelcascade.task import Task

from ..conftest import few_shot, held_out

LABELS = 20  # of csldcp's 67: enough to tell, cheap to cross-validate


@pytest.fixture(scope="module")
def csldcp():
    """Chinese abstracts of 20 disciplines, 8 per class, and held-out abstracts of the same disciplines."""
    texts, labels = few_shot("csldcp", 8)
    kept = sorted(set(labels))[:LABELS]
    train = [(text, label) for text, label in zip(texts, labels, strict=True) if label in kept]
    test = [(text, label) for text, label in zip(*held_out("csldcp", 1000), strict=True) if label in kept]
    return [t for t, _ in train], np.array([y for _, y in train]), [t for t, _ in test], np.array([y for _, y in test])


def test_the_ngrams_are_words_or_characters_by_script():
    assert analyzer_for(["How many people live in Lisbon?", "Who wrote Hamlet?"]) == "word"
    assert analyzer_for(["基于深度学习的图像分割方法研究", "水稻品种的抗病性分析"]) == "char"
    assert analyzer_for(["", "42"]) == "word"  # no letters: words, the default


def test_where_the_body_cannot_read_the_words_the_ngrams_carry_the_labels(csldcp, embed):
    """An English body (all-MiniLM-L6-v2) embeds Chinese abstracts as noise; their character n-grams still name the
    discipline. 'auto' finds that on the training texts alone (cross-validation) and the held-out accuracy rises."""
    texts, labels, test_texts, test_labels = csldcp
    X, X_test = embed(texts), embed(test_texts)
    plain = LinearSVMClassifier().fit(X, labels)
    auto = LinearSVMClassifier(text_features="auto").fit(X, labels, texts=texts)
    assert auto.text_weight_ > 0 and auto.uses_texts and auto.ngrams_.analyzer == "char"
    assert len(auto.ngrams_.terms_) <= MAX_NGRAMS
    plain_accuracy = (plain.predict(X_test) == test_labels).mean()
    auto_accuracy = (auto.predict(X_test, test_texts) == test_labels).mean()
    assert auto_accuracy >= plain_accuracy + 0.05, (plain_accuracy, auto_accuracy)
    proba = auto.predict_proba(X_test, test_texts)
    assert np.allclose(proba.sum(axis=1), 1.0)
    assert np.array_equal(proba.argmax(axis=1), auto.decision_function(X_test, test_texts).argmax(axis=1))


def test_where_the_ngrams_do_not_help_auto_keeps_the_vectors_alone(embed):
    """On sst2 at 8 per class the n-grams classify no more training texts right in cross-validation, so 'auto'
    keeps weight 0: the same model, answering without the texts."""
    texts, labels = few_shot("sst2", 8)
    test_texts, _ = held_out("sst2", 100)
    X = embed(texts)
    auto = LinearSVMClassifier(text_features="auto").fit(X, labels, texts=texts)
    plain = LinearSVMClassifier().fit(X, labels)
    assert auto.text_weight_ == 0 and not auto.uses_texts
    np.testing.assert_array_equal(auto.predict_proba(embed(test_texts)), plain.predict_proba(embed(test_texts)))


def test_a_model_with_ngrams_saves_reloads_and_needs_its_texts(csldcp, embed, tmp_path):
    texts, labels, test_texts, _ = csldcp
    X, X_test = embed(texts), embed(test_texts)
    model = LinearSVMClassifier(text_features=0.3).fit(X, labels, texts=texts)
    model.save(tmp_path)
    assert "pickle" not in (tmp_path / "model.json").read_text()
    reloaded = LinearSVMClassifier.load(tmp_path)
    assert reloaded.text_weight_ == 0.3 and reloaded.fingerprint() == model.fingerprint()
    np.testing.assert_allclose(reloaded.predict_proba(X_test, test_texts), model.predict_proba(X_test, test_texts),
                               atol=1e-6)
    assert model.fingerprint() != LinearSVMClassifier().fit(X, labels).fingerprint()
    with pytest.raises(ValueError, match="reads the texts' TF-IDF n-grams beside their vectors"):
        model.predict(X_test)
    with pytest.raises(ValueError, match="texts must be 3 strings, one per vector"):
        model.predict(X_test[:3], test_texts[:2])
    with pytest.raises(ValueError, match="pass the texts to fit with"):
        LinearSVMClassifier(text_features="auto").fit(X, labels)
    with pytest.raises(ValueError, match="text_features must be 'auto' or a weight >= 0"):
        LinearSVMClassifier(text_features="words")


def test_ngrams_rebuilt_from_their_arrays_give_the_same_rows_as_scikit_learn(csldcp):
    texts, _, test_texts, _ = csldcp
    for analyzer, train, test in (("char", texts, test_texts),
                                  ("word", few_shot("banking77", 8)[0], held_out("banking77", 200)[0])):
        ngrams = TextNgrams(analyzer).fit(train)
        expected = ngrams.vectorizer_.transform(test)
        assert abs(ngrams.transform(test) - expected).max() < 1e-6 and ngrams.transform(test).nnz == expected.nnz
        arrays = ngrams.to_arrays()
        rebuilt = TextNgrams.from_arrays(analyzer, arrays["ngram_bytes"], arrays["ngram_ends"], arrays["ngram_idf"])
        assert abs(rebuilt.transform(test) - expected).max() < 1e-6
    assert ngrams.transform(["", "zzzz qqqq"]).nnz == 0  # nothing known: an empty row, not a division by zero
    with pytest.raises(ValueError, match="distinct n-grams expected with one idf each"):
        TextNgrams.from_arrays("word", arrays["ngram_bytes"], arrays["ngram_ends"], arrays["ngram_idf"][:-1])
    with pytest.raises(ValueError, match="packed texts whose ends do not fit their bytes"):
        TextNgrams.from_arrays("word", arrays["ngram_bytes"][:-1], arrays["ngram_ends"], arrays["ngram_idf"])


def test_texts_without_ngrams_get_the_vectors_alone_or_a_clear_error(embed):
    texts, labels = ["👍", "👍👍", "🙂", "👌", "👎", "👎👎", "😠", "💩"], ["good"] * 4 + ["bad"] * 4
    X = embed(texts)
    assert LinearSVMClassifier(text_features="auto").fit(X, labels, texts=texts).text_weight_ == 0
    with pytest.raises(ValueError, match="the texts hold no word or character n-grams for TF-IDF features; use "
                                         "text_features=0"):
        LinearSVMClassifier(text_features=0.3).fit(X, labels, texts=texts)


def test_a_workspace_keeps_its_ngrams_through_save_reopen_and_retrain(csldcp, embedder, tmp_path):
    """A session's fallback reads the texts' n-grams at create ('auto'), in the saved workspace after reopening,
    and after a retrain; old workspaces (settings without the field) keep the vectors alone."""
    texts, labels, test_texts, _ = csldcp
    task = Task.from_labels(sorted(set(labels)), name="disciplines")
    session = Session.create(task, workspace=tmp_path / "ws", embedder=embedder, engine=None,
                             examples=(texts, list(labels)))
    assert session.cascade.fallback.uses_texts
    before = [p.probabilities for p in session.classify(test_texts[:20], learn=False)]
    session.close()
    reopened = Session.open(tmp_path / "ws", embedder=embedder)
    assert reopened._workspace.settings.text_features == "auto"
    assert [p.probabilities for p in reopened.classify(test_texts[:20], learn=False)] == before
    reopened.add_examples(test_texts[:5], [str(label) for label in csldcp[3][:5]], retrain=True)
    assert reopened.cascade.fallback.uses_texts
    reopened.close()
    settings = json.loads((tmp_path / "ws" / "settings.json").read_text())
    del settings["text_features"]  # as a workspace made before the field existed wrote it
    (tmp_path / "ws" / "settings.json").write_text(json.dumps(settings))
    old = Session.open(tmp_path / "ws", embedder=embedder)
    assert old._workspace.settings.text_features == 0 and old.cascade.fallback.uses_texts  # the saved model stands
    assert not old.retrain().cascade.fallback.uses_texts
    old.close()
    with pytest.raises(ValueError, match="text_features must be 'auto' or a weight >= 0, got 'yes'"):
        Session.create(task, workspace=tmp_path / "refused", embedder=embedder, engine=None, text_features="yes")
    assert not (tmp_path / "refused").exists()
