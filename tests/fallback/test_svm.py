"""The fallback session on real embeddings of real datasets."""

import json

import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier

from labelcascade.fallback import LinearSVMClassifier, NotFittedError
from labelcascade.fallback import svm as svm_module
from labelcascade.fallback.calibration import expected_calibration_error

from ..conftest import few_shot, held_out


@pytest.fixture(scope="module")
def banking(embed):
    """77 intents, 16 examples each: many classes with few shots, where calibration is hardest to get right."""
    train_texts, train_labels = few_shot("banking77", 16)
    test_texts, test_labels = held_out("banking77", 400)
    return embed(train_texts), np.array(train_labels), embed(test_texts), np.array(test_labels)


def test_probabilities_are_calibrated_at_16_per_class(banking):
    X, y, X_test, y_test = banking
    model = LinearSVMClassifier().fit(X, y)
    proba = model.predict_proba(X_test)
    y_index = np.searchsorted(model.classes_, y_test)
    assert np.allclose(proba.sum(axis=1), 1.0)
    assert expected_calibration_error(proba, y_index) <= 0.10
    # Calibration keeps the SVM's ranking: the answer is the decision function's argmax.
    assert np.array_equal(proba.argmax(axis=1), model.decision_function(X_test).argmax(axis=1))


def test_min_temperature_is_a_floor_the_fitted_temperature_may_rise_above(banking, tmp_path):
    """A tuned body's session passes the untuned body's temperature as the floor (`session.untuned_temperature`):
    below the fitted temperature it changes nothing, above it it softens the answers and never their ranking."""
    X, y, X_test, _ = banking
    plain = LinearSVMClassifier().fit(X, y)
    assert LinearSVMClassifier(min_temperature=plain.temperature_ / 2).fit(X, y).temperature_ == plain.temperature_
    floored = LinearSVMClassifier(min_temperature=2 * plain.temperature_).fit(X, y)
    assert floored.temperature_ == 2 * plain.temperature_
    assert np.array_equal(floored.predict(X_test), plain.predict(X_test))
    assert floored.predict_proba(X_test).max(axis=1).mean() < plain.predict_proba(X_test).max(axis=1).mean()
    floored.save(tmp_path / "m")
    loaded = LinearSVMClassifier.load(tmp_path / "m")
    assert loaded.min_temperature == floored.min_temperature and loaded.temperature_ == floored.temperature_
    for bad in (-0.1, float("nan"), float("inf"), "0.3", True):
        with pytest.raises(ValueError, match="min_temperature must be a finite number >= 0"):
            LinearSVMClassifier(min_temperature=bad)


def test_few_shot_accuracy_beats_nearest_neighbours(banking):
    X, y, X_test, y_test = banking
    svm_accuracy = (LinearSVMClassifier().fit(X, y).predict(X_test) == y_test).mean()
    knn_accuracy = (KNeighborsClassifier(8, metric="cosine").fit(X, y).predict(X_test) == y_test).mean()
    assert svm_accuracy > 0.8 and svm_accuracy >= knn_accuracy


def test_binary_task_at_8_per_class_gives_two_column_probabilities(embed):
    texts, labels = few_shot("sms_spam", 8)
    test_texts, test_labels = held_out("sms_spam", 200)
    model = LinearSVMClassifier().fit(embed(texts), labels)
    proba = model.predict_proba(embed(test_texts))
    assert list(model.classes_) == ["ham", "spam"] and proba.shape == (200, 2)
    assert np.allclose(proba.sum(axis=1), 1.0)
    assert (model.predict(embed(test_texts)) == np.array(test_labels)).mean() > 0.8


def test_save_and_load_give_identical_answers_without_pickle(banking, tmp_path):
    X, y, X_test, _ = banking
    model = LinearSVMClassifier(C=0.5).fit(X, y)
    model.save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["model.json", "model.npz"]
    loaded = LinearSVMClassifier.load(tmp_path / "m")
    assert np.array_equal(loaded.predict_proba(X_test), model.predict_proba(X_test))
    assert list(loaded.classes_) == list(model.classes_) and loaded.temperature_ == model.temperature_ and loaded.C == 0.5


def test_damaged_model_files_are_refused(banking, tmp_path):
    X, y, _, _ = banking
    LinearSVMClassifier().fit(X, y).save(tmp_path)
    (tmp_path / "model.npz").write_bytes(b"not a numpy file")
    with pytest.raises(ValueError, match="damaged"):
        LinearSVMClassifier.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="no saved fallback model"):
        LinearSVMClassifier.load(tmp_path / "absent")
    LinearSVMClassifier().fit(X, y).save(tmp_path)
    meta = json.loads((tmp_path / "model.json").read_text())
    meta["classes"] = meta["classes"][:-1]
    (tmp_path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="damaged"):
        LinearSVMClassifier.load(tmp_path)


def test_a_model_that_differs_from_what_was_saved_is_refused_not_used(banking, tmp_path):
    """Damage that still parses (a flipped byte in the weights, a swapped class name, a changed temperature) would
    give wrong answers: the sha256 recorded at save time catches it."""
    X, y, _, _ = banking
    LinearSVMClassifier().fit(X, y).save(tmp_path)
    saved = {name: (tmp_path / name).read_bytes() for name in ("model.npz", "model.json")}
    weights = bytearray(saved["model.npz"])
    weights[len(weights) // 2] ^= 0x01
    meta = json.loads(saved["model.json"])
    swapped = {**meta, "classes": [meta["classes"][1], meta["classes"][0], *meta["classes"][2:]]}
    for name, damaged in [("model.npz", bytes(weights)), ("model.json", json.dumps(swapped).encode()),
                          ("model.json", json.dumps({**meta, "temperature": meta["temperature"] * 2}).encode())]:
        (tmp_path / name).write_bytes(damaged)
        with pytest.raises(ValueError, match="damaged.*sha256"):
            LinearSVMClassifier.load(tmp_path)
        (tmp_path / name).write_bytes(saved[name])
    assert list(LinearSVMClassifier.load(tmp_path).classes_) == meta["classes"]


def test_a_model_without_a_checksum_or_with_impossible_numbers_is_refused(banking, tmp_path):
    """A model.json of format 1 carries no sha256, so swapped classes would load unnoticed; and a model whose
    digest was recomputed over a NaN or negative temperature would answer nonsense. Both are refused."""
    X, y, _, _ = banking
    LinearSVMClassifier().fit(X, y).save(tmp_path)
    meta = json.loads((tmp_path / "model.json").read_text())
    arrays = (tmp_path / "model.npz").read_bytes()
    unchecked = {key: value for key, value in meta.items() if key != "sha256"} | {"format_version": 1}
    unchecked["classes"] = [meta["classes"][1], meta["classes"][0], *meta["classes"][2:]]
    (tmp_path / "model.json").write_text(json.dumps(unchecked))
    with pytest.raises(ValueError, match=r"format_version 1 is not one of \(2, 3\), the ones that record a sha256"):
        LinearSVMClassifier.load(tmp_path)
    for temperature in (float("nan"), float("inf"), -1.0, 0.0, "2"):
        forged = {key: value for key, value in meta.items() if key != "sha256"} | {"temperature": temperature}
        forged["sha256"] = svm_module._digest(arrays, {k: v for k, v in forged.items()})
        (tmp_path / "model.json").write_text(json.dumps(forged))
        with pytest.raises(ValueError, match="not a finite number, or the temperature is not positive"):
            LinearSVMClassifier.load(tmp_path)


def test_sample_weights_change_the_decision():
    X = np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7], [0.72, 0.69]], dtype=np.float32)
    y = ["a", "b", "a", "b"]
    query = np.array([[0.71, 0.7]], dtype=np.float32)
    favour_a = LinearSVMClassifier(C=10).fit(X, y, sample_weight=[1, 1, 10, 0.1]).predict(query)[0]
    favour_b = LinearSVMClassifier(C=10).fit(X, y, sample_weight=[1, 1, 0.1, 10]).predict(query)[0]
    assert (favour_a, favour_b) == ("a", "b")


def test_multi_label_probabilities_are_per_label(embed):
    # Two real topics; a text made of one sentence of each carries both labels.
    texts, labels = few_shot("ag_news", 8)
    pairs = {label: [t for t, l in zip(texts, labels, strict=True) if l == label] for label in ("Sports", "Business")}
    rows = [(t,) for t in pairs["Sports"]] + [(t,) for t in pairs["Business"]]
    train_texts = pairs["Sports"] + pairs["Business"]
    train_texts += [a + " " + b for a, b in zip(pairs["Sports"], pairs["Business"], strict=True)]
    train_labels = [("Sports",)] * 8 + [("Business",)] * 8 + [("Sports", "Business")] * 8
    del rows
    model = LinearSVMClassifier(multi_label=True).fit(embed(train_texts), train_labels)
    assert list(model.classes_) == ["Business", "Sports"]
    proba = model.predict_proba(embed(train_texts))
    assert proba.shape == (24, 2) and np.all((proba >= 0) & (proba <= 1))
    indicator = model.predict(embed(train_texts))
    assert indicator[:8, 1].mean() >= 0.75 and indicator[8:16, 0].mean() >= 0.75


def test_bad_input_is_refused_with_a_clear_message(banking):
    X, y, _, _ = banking
    with pytest.raises(NotFittedError, match="call fit"):
        LinearSVMClassifier().predict(X)
    with pytest.raises(ValueError, match="give one label per row"):
        LinearSVMClassifier().fit(X, y[:-1])
    with pytest.raises(ValueError, match="at least 2 labels"):
        LinearSVMClassifier().fit(X[:3], ["a", "a", "a"])
    with pytest.raises(ValueError, match="NaN"):
        LinearSVMClassifier().fit(np.full_like(X, np.nan), y)
    model = LinearSVMClassifier().fit(X, y)
    with pytest.raises(ValueError, match="use the same embedder"):
        model.predict(X[:, :100])
    with pytest.raises(ValueError, match="sample_weight"):
        LinearSVMClassifier().fit(X, y, sample_weight=-np.ones(len(X)))
