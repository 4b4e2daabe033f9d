import numpy as np

from labelcascade.agent import Cascade
from labelcascade.fallback import LinearSVMClassifier
from labelcascade.records import Route
from labelcascade.task import Task


def test_labels_without_examples_get_zero_probability_and_task_order(embedder):
    task = Task.from_labels(["weather", "card", "refund"])
    texts = ["will it rain tomorrow", "is it sunny today", "my card is broken", "my card was declined"]
    fallback = LinearSVMClassifier().fit(embedder.embed(texts), ["weather", "weather", "card", "card"])
    prediction = Cascade(task, embedder, fallback).classify(["my card does not work"])[0]
    assert list(prediction.probabilities) == ["weather", "card", "refund"]
    assert prediction.probabilities["refund"] == 0.0
    assert prediction.label == "card" and prediction.labels == ["card"] and prediction.route is Route.FALLBACK
    assert prediction.confidence == max(prediction.probabilities.values())
    assert abs(sum(prediction.probabilities.values()) - 1.0) < 1e-6 and prediction.latency_ms > 0


def test_multi_label_answers_every_label_above_one_half(embedder):
    task = Task.from_labels(["sport", "money"], multi_label=True)
    texts = ["the team won the final", "the striker scored twice", "shares fell sharply", "the bank raised rates",
             "the club was sold for a record fee", "the player signed a huge contract"]
    labels = [("sport",), ("sport",), ("money",), ("money",), ("sport", "money"), ("sport", "money")]
    fallback = LinearSVMClassifier(multi_label=True).fit(embedder.embed(texts), labels)
    predictions = Cascade(task, embedder, fallback).classify(texts)
    for prediction in predictions:
        above = [label for label, p in prediction.probabilities.items() if p >= 0.5]
        assert sorted(prediction.labels) == sorted(above)
        assert prediction.label == (prediction.labels[0] if prediction.labels else None)
    assert np.mean([p.labels == ["sport"] or sorted(p.labels) == ["money", "sport"] for p in predictions[:2]]) == 1.0
