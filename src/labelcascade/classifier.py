"""`Classifier`: the cascade as a scikit-learn estimator.

    clf = Classifier(engine=None).fit(texts, labels)      # starts over: trains the fallback on these examples
    clf.predict(texts), clf.predict_proba(texts), clf.score(texts, labels), clf.classes_
    clf.classify(texts)                                   # full `Prediction`s (route, confidence, evidence)
    cross_val_score(Classifier(engine=None), texts, labels), GridSearchCV(Classifier(), {"C": [0.1, 1, 10]})

It keeps scikit-learn's contract: `__init__` stores its parameters and does nothing else; `fit` starts over and
sets the learned state in attributes ending in `_`; `predict`, `predict_proba`, `score` and `classify` change
nothing (they never learn from the LLM's answers and leave the examples and the model as they were);
`partial_fit` adds labelled examples and retrains. With an engine, `fit` calibrates the cascade on its own training
texts by cross-validation (`llm_calibration`). Learning from the LLM while answering, calibration on a dev set, the
answer cache and a durable workspace belong to `labelcascade.Session`; `save` writes a workspace that a session (and
so the CLI and the service) opens.

X is a sequence of texts (a list, a 1-D array or a pandas Series; a single-column 2-D array is accepted too, as
column transformers produce). y holds label names, one per text, or a list of names per text for multi-label
tasks: the LLM reads the labels, so they must be words, not numbers.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import NotFittedError as SklearnNotFittedError
from sklearn.metrics import accuracy_score
from sklearn.preprocessing import MultiLabelBinarizer

from labelcascade.agent import Policy
from labelcascade.agent.engines import DEFAULT_ENGINE, Engine, EngineError, load_engine
from labelcascade.fallback.svm import check_text_features
from labelcascade.records import Prediction
from labelcascade.retrieval import Embedder, load_embedder
from labelcascade.retrieval.embedders import TUNED_EMBEDDER
from labelcascade.session import ExamplesCannotCalibrate, Session, checked_texts, chosen_embedder, label_rows
from labelcascade.task import Task, TaskError
from labelcascade.workspace import Workspace

# Models loaded from a spec string, shared by every estimator of this process: `clone` and every fold of a search
# would otherwise load the same weights again. Both are read-only once loaded (an engine's prefix cache is reset
# before each predict, see `_answers`).
_embedders: dict[str, Embedder] = {}
_engines: dict[str, Engine] = {}


class Classifier(ClassifierMixin, BaseEstimator):
    """The cascade (fallback first, the LLM when unsure) as a scikit-learn classifier of texts.

    Parameters
    ----------
    task: a `Task` or the path of a task YAML file (its labels, descriptions and seed examples, which `fit` trains
        on too); None takes the labels from `y`.
    embedder: 'auto' (chosen by `fit`: the better of all-MiniLM-L6-v2 and multilingual-e5-small in
        cross-validation on the texts it is given, or by their language when they are too few; see
        `session.chosen_embedder`), 'default', 'multilingual', 'tuned' (the body 'auto' would pick, fine-tuned by
        `fit` on its texts, single-label only: SetFit's contrastive pairs, `fallback.body_tuning`), a local
        sentence-transformers folder, or an `Embedder`.
    engine: the LLM asked when the fallback is unsure: a spec string (default: the embedded model through
        llama.cpp; see `agent.engines.load_engine`), an `Engine`, or None for the fallback alone.
    policy: thresholds and LLM settings (`agent.Policy`); None: the defaults. Learning from the LLM is always off
        in the estimator (see `Session` for that).
    llm_calibration: with an engine, 'cv' (default): `fit` calibrates the cascade on its own training texts, as
        `Session.calibrate` does on a dev set, each text measured as one it has not seen (5-fold cross-validation
        for the fallback, the LLM shown examples other than the text itself: `Session.calibrate_on_examples`). It
        chooses the accept threshold, the LLM's weight (0 where the LLM does not beat the fallback: then it is never
        asked), temperature, label offsets and candidate count, replacing the policy's. One LLM call per training
        text (200 at most); an engine that cannot answer fails `fit`; a multi-label task, or a label with fewer
        than 2 texts, is left uncalibrated with a warning. With embedder 'tuned' the body has seen every training
        text, so the fallback's held-out answers are surer than on new texts and the LLM is asked less than a dev
        set would choose. None: the policy as given (the LLM answers every text the fallback is less than
        `accept_threshold` sure of).
    C: inverse regularisation of the fallback's linear SVM.
    text_features: the weight of the texts' TF-IDF n-grams beside their vectors in the fallback's SVM: 'auto'
        (chosen by `fit` by cross-validation on its texts; 0 unless that classifies more of them right), a weight,
        or 0 (vectors only).
    tuning_seconds: with embedder 'tuned', the most `fit` spends tuning the body; None: a few minutes, longer in
        proportion for many or long texts (`fallback.body_tuning.planned_seconds`).
    """

    def __init__(
        self,
        task: Task | str | Path | None = None,
        *,
        embedder: str | Embedder = "auto",
        engine: str | Engine | None = DEFAULT_ENGINE,
        policy: Policy | None = None,
        C: float = 1.0,
        text_features: float | str = "auto",
        tuning_seconds: float | None = None,
        llm_calibration: str | None = "cv",
    ):
        self.task = task
        self.embedder = embedder
        self.engine = engine
        self.policy = policy
        self.llm_calibration = llm_calibration
        self.C = C
        self.text_features = text_features
        self.tuning_seconds = tuning_seconds

    # --- learning -------------------------------------------------------------------------------------------

    def fit(self, X, y) -> Classifier:
        """Start over: a fresh example store and fallback trained on (X, y) and the task's seed examples."""
        texts, labels = _texts(X), _labels(y)
        task = self._task(labels)
        if not isinstance(self.C, int | float) or not self.C > 0:
            raise ValueError(f"C must be a positive number, got {self.C!r}")
        check_text_features(self.text_features)
        if self.policy is not None and not isinstance(self.policy, Policy):
            raise TypeError(f"policy must be a labelcascade Policy or None, got {type(self.policy).__name__}")
        if self.llm_calibration not in ("cv", None):
            raise ValueError(f"llm_calibration must be 'cv' (calibrate on the training texts) or None, got "
                             f"{self.llm_calibration!r}")
        self._close_session()
        embedder = self.embedder
        if embedder == "auto":  # chosen on the texts it is fitted on (and the task's seeds)
            seeds = task.seed_examples()
            embedder = chosen_embedder(task, [*texts, *(text for text, _ in seeds)], [*labels, *(row for _, row in seeds)],
                                       load=lambda spec: _shared(_embedders, spec, load_embedder))
        self.session_ = Session.create(
            task,
            embedder=embedder if embedder == TUNED_EMBEDDER else _shared(_embedders, embedder, load_embedder),
            engine=None if self.engine is None else _shared(_engines, self.engine, load_engine),
            policy=(self.policy or Policy()).model_copy(update={"learn": False}),
            svm_C=float(self.C),
            text_features=self.text_features,
            examples=(texts, labels),
            tuning_seconds=self.tuning_seconds,
        )
        if self.engine is not None and self.llm_calibration == "cv":
            try:
                self.session_.calibrate_on_examples()
            except EngineError as error:
                self._close_session()
                raise EngineError(f"fit calibrates the LLM on the training texts and could not ask it: {error}; start "
                                  "the engine, or fit with llm_calibration=None (the policy as given) or engine=None "
                                  "(the fallback alone)") from error
            except ExamplesCannotCalibrate as error:
                warnings.warn(f"the LLM is not calibrated: {error}; it will answer every text the fallback is less "
                              f"than {self.session_.policy.accept_threshold:.0%} sure of", stacklevel=2)
        self.task_ = task
        self.classes_ = np.array(task.label_names)
        return self

    def partial_fit(self, X, y) -> Classifier:
        """Add (X, y) as labelled examples to what the estimator knows and retrain; the first call is `fit`. The
        policy `fit` calibrated stays as it was (calibrating again would ask the LLM about every text again)."""
        if not hasattr(self, "session_"):
            return self.fit(X, y)
        _learn(self.session_, _texts(X), _labels(y))
        return self

    # --- answering ------------------------------------------------------------------------------------------

    def classify(self, X) -> list[Prediction]:
        """A full `Prediction` per text: label(s), confidence, probabilities, route, evidence, latency."""
        return self._answers(X)

    def predict_proba(self, X) -> np.ndarray:
        """Probabilities (n_texts, n_labels), columns in `classes_` order; for multi-label tasks each column is
        the probability that its label applies."""
        predictions = self._answers(X)
        return np.array([[p.probabilities[label] for label in self.classes_] for p in predictions])

    def predict(self, X) -> np.ndarray:
        """The label per text; for multi-label tasks an indicator matrix over `classes_`. A task that allows
        abstaining answers None where the cascade abstains."""
        predictions = self._answers(X)
        if self.task_.multi_label:
            return np.array([[label in p.labels for label in self.classes_] for p in predictions], dtype=int)
        return np.array([p.label for p in predictions], dtype=object)

    def score(self, X, y, sample_weight=None) -> float:
        """Accuracy (exact match of the label set for multi-label tasks)."""
        predicted = self.predict(X)
        if self.task_.multi_label:
            y = MultiLabelBinarizer(classes=list(self.classes_)).fit_transform(label_rows(_labels(y)))
        else:
            y = np.asarray(list(y), dtype=object)
        return float(accuracy_score(y, predicted, sample_weight=sample_weight))

    def _answers(self, X) -> list[Prediction]:
        if not hasattr(self, "session_"):
            raise SklearnNotFittedError(
                "this Classifier is not fitted yet: call fit(texts, labels) with labelled texts first"
            )
        texts = _texts(X)
        engine = self.session_.cascade.engine
        reset = getattr(engine.loaded, "reset", None) if engine is not None else None
        if reset is not None:
            reset()  # scores must not depend on what the engine scored before (its prefix cache's layout)
        return self.session_.classify(texts, learn=False)

    # --- keeping it -----------------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write the fitted state as a workspace folder (new or empty) that `Session.open`, `load` and the CLI
        and service open. The estimator keeps answering from its own copy."""
        if not hasattr(self, "session_"):
            raise SklearnNotFittedError("this Classifier is not fitted yet: fit it before saving")
        return self.session_.copy_to(path)

    @classmethod
    def load(cls, path: str | Path, *, engine: str | Engine | None = "saved") -> Classifier:
        """A fitted estimator from a workspace folder, answering from a private copy (the folder is not changed).
        `engine`: the workspace's saved engine, another spec, or None for the fallback alone."""
        workspace = Workspace.open(path)
        settings = workspace.settings
        estimator = cls(
            workspace.task,
            embedder=settings.embedder,
            engine=settings.engine if engine == "saved" else engine,
            policy=settings.policy,
            C=settings.svm_C,
            text_features=settings.text_features,
        )
        estimator.session_ = Session.open(
            path,  # a tuned body is the workspace's own (checked against its digest), never shared
            embedder=(None if settings.embedder == TUNED_EMBEDDER
                      else _shared(_embedders, estimator.embedder, load_embedder)),
            engine=None if estimator.engine is None else _shared(_engines, estimator.engine, load_engine),
            private_copy=True,
        )
        estimator.task_ = estimator.session_.task
        estimator.classes_ = np.array(estimator.task_.label_names)
        return estimator

    def _task(self, labels: list[tuple[str, ...]]) -> Task:
        """The task to fit: the `task` parameter, or one made from the labels seen in y."""
        if self.task is None:
            multi = any(len(row) != 1 for row in labels)
            return Task.from_labels(sorted({label for row in labels for label in row}), multi_label=multi)
        task = self.task if isinstance(self.task, Task) else Task.from_yaml(self.task)
        task.check_labels(labels)
        return task

    def _close_session(self) -> None:
        session = self.__dict__.pop("session_", None)
        if session is not None:
            session.close()

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.string = True
        tags.target_tags.required = True
        tags.non_deterministic = False
        return tags

    def __getstate__(self):
        """Refuse pickling a fitted estimator: its state is a workspace folder (`save` it) with models loaded."""
        if "session_" in self.__dict__:
            raise TypeError("a fitted labelcascade Classifier is not picklable: save(path) it and load(path) it")
        return super().__getstate__()

    def __del__(self):
        try:
            self._close_session()
        except Exception:  # noqa: BLE001 - interpreter shutdown may have torn down what closing needs
            pass


def _learn(session: Session, texts: list[str], labels: list[tuple[str, ...]]) -> None:
    session.add_examples(texts, labels, retrain=True)


def _shared(cache: dict, spec, load):
    """The process-wide model for a spec string (loaded once); an object passed in is used as it is."""
    if not isinstance(spec, str):
        return load(spec) if load is load_embedder else spec
    if spec not in cache:
        cache[spec] = load(spec)
    return cache[spec]


def _texts(X) -> list[str]:
    """X as a list of texts; a clear error for what is not a sequence of texts."""
    if isinstance(X, str):
        raise TypeError("X must be a sequence of texts, not a single string; wrap it in a list")
    if hasattr(X, "ndim") and getattr(X, "ndim", 1) == 2:
        if X.shape[1] != 1:
            raise ValueError(f"X has shape {X.shape}: give one text per row, as a 1-D sequence or a single column")
        X = np.asarray(X).ravel()
    if hasattr(X, "tolist"):
        X = X.tolist()
    texts = checked_texts(X)
    if not texts:
        raise ValueError("X is empty: give at least one text")
    return texts


def _labels(y) -> list[tuple[str, ...]]:
    """y as one tuple of label names per text; numbers are refused because the LLM reads the labels."""
    if hasattr(y, "tolist"):
        y = y.tolist()
    if isinstance(y, Sequence) and not isinstance(y, str):
        for i, label in enumerate(y):
            if isinstance(label, bool | int | float | np.number):
                raise TaskError(
                    f"row {i}: label {label!r} is a number; the LLM reads label names, so give names (map your class "
                    "ids to words, e.g. {0: 'negative', 1: 'positive'})"
                )
    return label_rows(y)

