"""Label-bias calibration on known numbers: it undoes a lean it can see, and stays off where there is none."""

import numpy as np

from labelcascade.agent import label_bias
from labelcascade.agent.calibration import DevSet


def leaning_scores(n: int = 200, lean: float = 3.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two labels; the score of the true label is higher by a noisy margin, and label 1 gets `lean` on top, so the
    plain argmax answers 1 far too often (as Gemma answers "spam")."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 2, n)
    logprobs = rng.normal(0, 1, (n, 2))
    logprobs[np.arange(n), truth] += 2.0
    logprobs[:, 1] += lean
    return logprobs, truth


def test_offsets_undo_a_lean_toward_one_label():
    logprobs, truth = leaning_scores()
    plain = (logprobs.argmax(axis=1) == truth).mean()
    chosen = label_bias.choose(logprobs, truth)
    assert chosen is not None and chosen.accuracy_without == plain
    assert chosen.accuracy_with > plain + 0.2  # held-out folds, not the texts the offsets were fitted on
    assert chosen.bias[0] - chosen.bias[1] > 1.5  # the lean, cancelled (the offsets are shrunk toward 0)
    fresh, fresh_truth = leaning_scores(seed=1)
    answers = label_bias.biased_softmax(fresh, chosen.temperature, chosen.bias).argmax(axis=1)
    assert (answers == fresh_truth).mean() > (fresh.argmax(axis=1) == fresh_truth).mean() + 0.2


def test_no_offsets_without_a_lean_or_with_too_few_texts():
    logprobs, truth = leaning_scores(lean=0.0)
    assert label_bias.choose(logprobs, truth) is None  # nothing to undo: held-out accuracy does not rise
    leaning, leaning_truth = leaning_scores()
    assert label_bias.choose(leaning[: label_bias.MIN_TEXTS - 1], leaning_truth[: label_bias.MIN_TEXTS - 1]) is None


def test_labels_outside_the_candidates_and_texts_without_a_label_are_left_out():
    logprobs, truth = leaning_scores()
    three = np.c_[logprobs, np.full(len(truth), -np.inf)]  # a third label, never a candidate
    truth = truth.copy()
    truth[:10] = -1  # texts with no label (out of scope)
    chosen = label_bias.choose(three, truth)
    assert chosen is not None and np.isfinite(chosen.bias).all()
    proba = label_bias.biased_softmax(three, chosen.temperature, chosen.bias)
    assert np.allclose(proba.sum(axis=1), 1.0) and (proba[:, 2] == 0).all()


def test_a_dev_set_keeps_its_offsets_through_save_and_load_and_a_new_label(tmp_path):
    logprobs, truth = leaning_scores(n=40)
    dev = DevSet(np.zeros((40, 3)), truth, label_bias.biased_softmax(logprobs, 1.0), 1.0, 2, 1.0,
                 np.array([0.5, -0.5]), (0.6, 0.8))
    dev.save(tmp_path / "calibration.npz")
    loaded = DevSet.load(tmp_path / "calibration.npz")
    assert np.array_equal(loaded.label_bias, dev.label_bias) and loaded.bias_accuracy == (0.6, 0.8)
    assert loaded.bias_by_label(["ham", "spam"]) == {"ham": 0.5, "spam": -0.5}
    grown = loaded.with_label_added(multi_label=False)
    assert grown.bias_by_label(["ham", "spam", "new"]) == {"ham": 0.5, "spam": -0.5, "new": 0.0}
