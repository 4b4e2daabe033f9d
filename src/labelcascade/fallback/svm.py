"""The fallback classifier: a linear SVM over text embeddings, with calibrated probabilities.

It follows scikit-learn's contract (`fit`, `predict`, `predict_proba`, `decision_function`, `classes_`), takes
embedding vectors rather than texts (the cascade embeds each text once and shares the vector with retrieval),
and keeps its learned state in plain arrays, so it saves as `.npz` + JSON and never needs pickle. `model.json`
records the sha256 of both files' content, and `load` refuses a model whose files do not match it: a damaged model
must be an error, never a source of wrong answers.

Probabilities: single-label answers are a softmax over the one-vs-rest decision scores with one temperature;
multi-label answers pass each label's score through one shared sigmoid. Both are fitted on out-of-fold scores,
which keeps them honest at few shots (see `calibration`).

With `text_features` the SVM also sees the texts' TF-IDF n-grams beside the vectors (`text_features`, the sparse
tier): its methods then take the texts too, and the saved model keeps the n-grams and their idf as arrays.
"""

from __future__ import annotations

import hashlib
import io
import math
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sklearn.model_selection import KFold, StratifiedKFold
from sklearn.preprocessing import MultiLabelBinarizer
from sklearn.svm import LinearSVC

from labelcascade.fallback.calibration import fit_platt, fit_temperature, sigmoid, softmax_with_temperature
from labelcascade.fallback.text_features import TextNgrams, analyzer_for, appended, choose_weight

_FORMAT_VERSION = 3  # 3 adds the TF-IDF n-grams; 2 (no n-grams) still loads
_READABLE_VERSIONS = (2, 3)  # version 1 (no sha256) is refused: nothing would show it was not altered
AUTO = "auto"
UNCALIBRATED_TEMPERATURE = 1.0  # used when some class has a single example and cross-validation is impossible


class NotFittedError(RuntimeError):
    """The classifier was asked to predict before it was fitted."""


class LinearSVMClassifier:
    """Linear SVM with calibrated probabilities, for single-label or multi-label tasks.

    Parameters
    ----------
    C: inverse regularisation strength of the SVM.
    multi_label: if true, `y` holds a sequence of labels per row and each label is a separate yes/no decision.
    cv: folds used to collect out-of-fold scores for calibration (fewer if a class has fewer examples).
    random_state: seed for the folds and the SVM solver.
    text_features: the weight of the texts' TF-IDF n-grams appended to the vectors (0: vectors only), or 'auto':
        chosen at each `fit` by cross-validation on the training texts (`text_features.choose_weight`; 0 unless it
        classifies more of them right; multi-label tasks get 0). `text_weight_` is the one used.
    min_temperature: the least temperature single-label answers get (0: what the out-of-fold scores say). For
        vectors from a body tuned on the very texts the SVM learns from: their out-of-fold scores are in-sample for
        the body, so the temperature fitted on them comes out too low (answers too sure), at times far too low;
        the session passes the temperature this SVM fits over the untuned body, whose out-of-fold texts nothing
        had seen (`session.untuned_temperature`).
    """

    def __init__(self, C: float = 1.0, *, multi_label: bool = False, cv: int = 5, random_state: int = 0,
                 text_features: float | str = 0.0, min_temperature: float = 0.0):
        if C <= 0:
            raise ValueError(f"C must be positive, got {C}")
        if cv < 2:
            raise ValueError(f"cv must be at least 2, got {cv}")
        check_text_features(text_features)
        if isinstance(min_temperature, bool) or not (
            isinstance(min_temperature, int | float) and math.isfinite(min_temperature) and min_temperature >= 0
        ):
            raise ValueError(f"min_temperature must be a finite number >= 0, got {min_temperature!r}")
        self.C = C
        self.multi_label = multi_label
        self.cv = cv
        self.random_state = random_state
        self.text_features = text_features
        self.min_temperature = min_temperature

    # --- learning -------------------------------------------------------------------------------------------

    def fit(self, X: np.ndarray, y: Sequence, sample_weight: Sequence[float] | None = None,
            texts: Sequence[str] | None = None) -> LinearSVMClassifier:
        """Learn from vectors `X` (n, d) and labels `y` (one per row, or a sequence per row if multi_label); `texts`
        (one per row) are needed, and only read, when `text_features` is not 0."""
        X = _check_vectors(X)
        if len(y) != len(X):
            raise ValueError(f"X has {len(X)} rows but y has {len(y)} labels; give one label per row")
        weights = np.ones(len(X)) if sample_weight is None else np.asarray(sample_weight, dtype=float)
        if weights.shape != (len(X),) or not np.all(np.isfinite(weights)) or np.any(weights < 0):
            raise ValueError(f"sample_weight must hold {len(X)} finite non-negative numbers")
        if self.text_features:
            texts = _check_texts(texts, len(X), "fit")
        if self.multi_label:
            self.text_weight_ = 0.0 if self.text_features == AUTO else float(self.text_features)
            self._fit_multi_label(X, y, weights, texts)
        else:
            self._fit_single_label(X, np.asarray(y, dtype=object).astype(str), weights, texts)
        self.n_features_in_ = X.shape[1]
        return self

    def _fit_single_label(self, X: np.ndarray, y: np.ndarray, weights: np.ndarray, texts: list[str] | None) -> None:
        classes, y_index, counts = np.unique(y, return_inverse=True, return_counts=True)
        if len(classes) < 2:
            raise ValueError(f"need examples of at least 2 labels to fit, got only {list(classes)}")
        if self.text_features == AUTO:
            self.text_weight_ = choose_weight(X, texts, y_index, weights, self._fit_svm, random_state=self.random_state)
        else:
            self.text_weight_ = float(self.text_features)
        n_splits = min(self.cv, int(counts.min()))
        if n_splits >= 2:
            folds = StratifiedKFold(n_splits, shuffle=True, random_state=self.random_state).split(X, y_index)
            scores = np.empty((len(X), len(classes)))
            for train, test in folds:
                fold = self._fit_linear(X, texts, train, y_index, weights, self._fit_svm)
                scores[test] = _single_label_scores(fold.scores(X[test], _rows(texts, test)))
            self.temperature_ = max(fit_temperature(scores, y_index, weights), self.min_temperature)
        else:
            self.temperature_ = max(UNCALIBRATED_TEMPERATURE, self.min_temperature)
        self.classes_ = classes
        self._keep(self._fit_linear(X, texts, np.arange(len(X)), y_index, weights, self._fit_svm))

    def _fit_multi_label(self, X: np.ndarray, y: Sequence[Sequence[str]], weights: np.ndarray,
                         texts: list[str] | None) -> None:
        rows = [(row,) if isinstance(row, str) else tuple(row) for row in y]
        binarizer = MultiLabelBinarizer()
        Y = binarizer.fit_transform(rows)
        if Y.shape[1] < 1:
            raise ValueError("need at least one label among the examples to fit")
        n_splits = min(self.cv, len(X))
        if n_splits >= 2:
            scores = np.empty(Y.shape)
            for train, test in KFold(n_splits, shuffle=True, random_state=self.random_state).split(X):
                fold = self._fit_linear(X, texts, train, Y, weights, self._fit_one_vs_rest)
                scores[test] = fold.scores(X[test], _rows(texts, test))
            self.platt_ = fit_platt(scores.ravel(), Y.ravel()) if 0 < Y.mean() < 1 else (1.0, 0.0)
        else:
            self.platt_ = (1.0, 0.0)
        self.classes_ = np.asarray(binarizer.classes_)
        self._keep(self._fit_linear(X, texts, np.arange(len(X)), Y, weights, self._fit_one_vs_rest))

    def _fit_linear(self, X, texts, rows, target, weights, fit) -> _Linear:
        """`fit` on `rows` of the vectors, with their texts' TF-IDF n-grams (fitted on those texts) at
        `text_weight_` beside them when it is not 0."""
        weight = self.text_weight_
        if not weight:
            return _Linear(*fit(X[rows], target[rows], weights[rows]))
        texts = _rows(texts, rows)
        ngrams = TextNgrams(analyzer_for(texts)).fit(texts)
        coef, intercept = fit(appended(X[rows], ngrams.transform(texts), weight), target[rows], weights[rows])
        d = X.shape[1]
        return _Linear(np.ascontiguousarray(coef[:, :d]), intercept, ngrams, (weight * coef[:, d:]).astype(np.float32))

    def _keep(self, linear: _Linear) -> None:
        self.coef_, self.intercept_, self.ngrams_, self.text_coef_ = (
            linear.coef, linear.intercept, linear.ngrams, linear.text_coef)

    def _fit_svm(self, X, y_index: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # The dual solver: with a few thousand examples it was twice as fast as the primal one that dual='auto'
        # picks (BENCHMARKS.md, "Measurements behind the code").
        svm = LinearSVC(C=self.C, dual=True, random_state=self.random_state).fit(X, y_index, sample_weight=weights)
        return svm.coef_.astype(np.float32), svm.intercept_.astype(np.float32)

    def _fit_one_vs_rest(self, X, Y: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One binary SVM per label; a label that is always (or never) present gets a constant score of +1 (or -1)."""
        coef = np.zeros((Y.shape[1], X.shape[1]), dtype=np.float32)
        intercept = np.zeros(Y.shape[1], dtype=np.float32)
        for j in range(Y.shape[1]):
            if Y[:, j].min() == Y[:, j].max():
                intercept[j] = 1.0 if Y[0, j] else -1.0
                continue
            svm_coef, svm_intercept = self._fit_svm(X, Y[:, j], weights)
            coef[j], intercept[j] = svm_coef[0], svm_intercept[0]
        return coef, intercept

    # --- answering ------------------------------------------------------------------------------------------

    def decision_function(self, X: np.ndarray, texts: Sequence[str] | None = None) -> np.ndarray:
        """Raw SVM scores, one column per class in `classes_` order; `texts` (one per row) when the model has
        TF-IDF features (`uses_texts`), else ignored."""
        self._check_fitted()
        X = _check_vectors(X, dim=self.n_features_in_)
        linear = _Linear(self.coef_, self.intercept_, self.ngrams_, self.text_coef_)
        scores = linear.scores(X, _check_texts(texts, len(X), "answer") if self.uses_texts else None)
        return scores if self.multi_label else _single_label_scores(scores)

    def predict_proba(self, X: np.ndarray, texts: Sequence[str] | None = None) -> np.ndarray:
        """Calibrated probabilities (n, n_classes): rows sum to 1 for single-label, each cell is P(label) for multi-label."""
        scores = self.decision_function(X, texts)
        if self.multi_label:
            return sigmoid(scores, *self.platt_)
        return softmax_with_temperature(scores, self.temperature_)

    def predict(self, X: np.ndarray, texts: Sequence[str] | None = None) -> np.ndarray:
        """The most probable label per row; for multi-label, an indicator matrix of labels with P >= 0.5."""
        proba = self.predict_proba(X, texts)
        if self.multi_label:
            return (proba >= 0.5).astype(int)
        return self.classes_[proba.argmax(axis=1)]

    @property
    def uses_texts(self) -> bool:
        """Whether answering needs the texts beside their vectors (the fitted model has TF-IDF features)."""
        self._check_fitted()
        return self.ngrams_ is not None

    # --- persistence ----------------------------------------------------------------------------------------

    def save(self, folder: str | Path) -> None:
        """Write `model.npz` (weights) and `model.json` (everything else, and the sha256 of both) into `folder`."""
        self._check_fitted()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        arrays = io.BytesIO()
        ngrams = {} if self.ngrams_ is None else {**self.ngrams_.to_arrays(), "text_coef": self.text_coef_}
        np.savez(arrays, coef=self.coef_, intercept=self.intercept_, **ngrams)
        meta = {
            "format_version": _FORMAT_VERSION,
            "C": self.C,
            "multi_label": self.multi_label,
            "cv": self.cv,
            "random_state": self.random_state,
            "text_features": self.text_features,
            "min_temperature": self.min_temperature,
            "text_weight": self.text_weight_,
            "ngram_analyzer": None if self.ngrams_ is None else self.ngrams_.analyzer,
            "classes": [str(label) for label in self.classes_],
            "n_features_in": int(self.n_features_in_),
            "temperature": getattr(self, "temperature_", None),
            "platt": list(getattr(self, "platt_", ())) or None,
        }
        meta["sha256"] = _digest(arrays.getvalue(), meta)
        (folder / "model.npz").write_bytes(arrays.getvalue())
        (folder / "model.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")

    @classmethod
    def load(cls, folder: str | Path) -> LinearSVMClassifier:
        """Read a model written by `save`, checking its sha256; arrays are loaded with pickling disabled.

        ValueError (naming the folder) when the files are damaged: truncated, unreadable or not what was saved.
        """
        folder = Path(folder)
        damaged = f"{folder}: the saved fallback model is damaged"
        try:
            meta = json.loads((folder / "model.json").read_text(encoding="utf-8"))
            arrays = (folder / "model.npz").read_bytes()
        except FileNotFoundError as error:
            raise FileNotFoundError(f"{folder}: no saved fallback model ({Path(error.filename).name} missing)") from None
        except (ValueError, OSError) as error:
            raise ValueError(f"{damaged} ({error})") from None
        if not isinstance(meta, dict) or meta.get("format_version") not in _READABLE_VERSIONS:
            version = meta.get("format_version") if isinstance(meta, dict) else None
            raise ValueError(f"{folder}/model.json: format_version {version!r} is not one of {_READABLE_VERSIONS}, "
                             "the ones that record a sha256 to check the model against")
        recorded = meta.pop("sha256", None)
        if recorded != _digest(arrays, meta):
            raise ValueError(f"{damaged} (model.npz or model.json does not match the sha256 recorded when it "
                             "was saved)")
        try:
            with np.load(io.BytesIO(arrays), allow_pickle=False) as stored:
                coef, intercept = stored["coef"], stored["intercept"]
                analyzer = meta.get("ngram_analyzer")
                ngrams = None if analyzer is None else TextNgrams.from_arrays(
                    analyzer, stored["ngram_bytes"], stored["ngram_ends"], stored["ngram_idf"])
                text_coef = None if analyzer is None else stored["text_coef"]
            model = cls(meta["C"], multi_label=meta["multi_label"], cv=meta["cv"], random_state=meta["random_state"],
                        text_features=meta.get("text_features", 0.0),
                        min_temperature=meta.get("min_temperature", 0.0))
            model.classes_ = np.asarray(meta["classes"])
            model.n_features_in_ = meta["n_features_in"]
            model.text_weight_ = float(meta.get("text_weight", 0.0))
        except (ValueError, KeyError, TypeError, OSError) as error:
            raise ValueError(f"{damaged} ({error})") from None
        rows = 1 if len(model.classes_) == 2 and not model.multi_label else len(model.classes_)
        if coef.shape != (rows, model.n_features_in_) or intercept.shape != (rows,) or (
            ngrams is not None and (text_coef.shape != (rows, len(ngrams.terms_)) or not np.isfinite(text_coef).all())
        ):
            raise ValueError(f"{damaged} (weights of shape {coef.shape})")
        model.coef_, model.intercept_, model.ngrams_, model.text_coef_ = coef, intercept, ngrams, text_coef
        calibration = list(meta["platt"] or []) if model.multi_label else [meta["temperature"]]
        numbers = [value for value in calibration if isinstance(value, int | float) and math.isfinite(value)]
        usable = len(numbers) == len(calibration) == (2 if model.multi_label else 1)
        if not usable or (not model.multi_label and numbers[0] <= 0) or not (
            np.isfinite(coef).all() and np.isfinite(intercept).all()
        ):
            raise ValueError(f"{damaged} (a weight or its calibration is not a finite number, or the temperature is "
                             "not positive)")
        if model.multi_label:
            model.platt_ = tuple(meta["platt"])
        else:
            model.temperature_ = meta["temperature"]
        return model

    def fingerprint(self) -> str:
        """A digest of what the model answers with (weights, classes, calibration): equal digests, equal answers.
        The answer cache keys on it, so a retrained model's answers are computed afresh."""
        self._check_fitted()
        digest = hashlib.sha256(np.ascontiguousarray(self.coef_, dtype=np.float64).tobytes())
        digest.update(np.ascontiguousarray(self.intercept_, dtype=np.float64).tobytes())
        if self.ngrams_ is not None:
            digest.update(np.ascontiguousarray(self.text_coef_).tobytes())
            digest.update(self.ngrams_.digest())
        calibration = {"classes": [str(label) for label in self.classes_], "multi_label": self.multi_label,
                       "temperature": getattr(self, "temperature_", None), "platt": list(getattr(self, "platt_", ()))}
        digest.update(json.dumps(calibration, sort_keys=True).encode())
        return digest.hexdigest()[:16]

    def _check_fitted(self) -> None:
        if not hasattr(self, "coef_"):
            raise NotFittedError("this fallback classifier is not fitted yet; call fit() with labelled examples first")


def check_text_features(value: object) -> None:
    """ValueError unless `value` is 'auto' or a finite weight >= 0: what `text_features` takes."""
    if value != AUTO and not (isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < math.inf):
        raise ValueError(f"text_features must be 'auto' or a weight >= 0, got {value!r}")


class _Linear:
    """One fitted linear model: weights over the vectors, and over the texts' TF-IDF n-grams when it has them."""

    def __init__(self, coef: np.ndarray, intercept: np.ndarray, ngrams: TextNgrams | None = None,
                 text_coef: np.ndarray | None = None):
        self.coef, self.intercept, self.ngrams, self.text_coef = coef, intercept, ngrams, text_coef

    def scores(self, X: np.ndarray, texts: list[str] | None) -> np.ndarray:
        """One column per SVM (the one of a binary task, or one per class)."""
        scores = X @ self.coef.T + self.intercept
        if self.ngrams is not None:
            scores = scores + np.asarray(self.ngrams.transform(texts) @ self.text_coef.T)
        return scores


def _single_label_scores(scores: np.ndarray) -> np.ndarray:
    """Decision scores with one column per class; a binary SVM's single score s becomes the pair (-s/2, s/2)."""
    if scores.shape[1] == 1:
        return np.hstack([-scores / 2, scores / 2])
    return scores


def _rows(texts: list[str] | None, rows: np.ndarray) -> list[str] | None:
    return None if texts is None else [texts[i] for i in rows]


def _check_texts(texts: Sequence[str] | None, n: int, doing: str) -> list[str]:
    if texts is None:
        raise ValueError(f"this fallback reads the texts' TF-IDF n-grams beside their vectors (text_features); "
                         f"pass the texts to {doing} with, one per vector")
    if isinstance(texts, str) or len(texts) != n or not all(isinstance(text, str) for text in texts):
        raise ValueError(f"texts must be {n} strings, one per vector")
    return list(texts)


def _digest(arrays: bytes, meta: dict) -> str:
    """sha256 of the weights file's bytes and of the metadata (canonical JSON, without the digest itself)."""
    digest = hashlib.sha256(arrays)
    digest.update(json.dumps(meta, sort_keys=True).encode())
    return digest.hexdigest()


def _check_vectors(X: np.ndarray, dim: int | None = None) -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2:
        raise ValueError(f"expected a 2-D array of embedding vectors (n_texts, dim), got shape {X.shape}")
    if dim is not None and X.shape[1] != dim:
        raise ValueError(f"vectors have {X.shape[1]} dimensions but the classifier was fitted on {dim}; use the same embedder")
    if not np.all(np.isfinite(X)):
        raise ValueError("vectors contain NaN or infinite values")
    return X
