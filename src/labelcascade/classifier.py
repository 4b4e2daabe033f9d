"""The Python API: `Classifier`, with scikit-learn's contract plus `classify()` for full predictions.

    clf = Classifier("examples/banking/task.yaml")        # trains on the task's seed examples
    clf.classify("my card hasn't arrived")                 # -> Prediction(label=..., confidence=..., route=...)
    clf.fit(texts, labels)                                 # add gold examples and retrain
    clf.calibrate(dev_texts, dev_labels)                   # thresholds and LLM weight from a labelled dev set
    clf.predict(texts), clf.predict_proba(texts), clf.classes_
    clf.save("my-workspace"); Classifier.open("my-workspace")

A classifier lives in a workspace folder (a temporary one until you `save`), which holds its task, examples
and models. Unlike a plain scikit-learn estimator, `fit` adds to what the workspace already knows rather than
starting over: the examples are the model, and they accumulate, also from the LLM's confident answers.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from labelcascade.agent import Calibration, Cascade, DevSet, EngineSlot, Learner, Policy, choose_policy
from labelcascade.agent.engines import DEFAULT_ENGINE, Engine
from labelcascade.answer_cache import CACHE_FILE, AnswerCache, task_version
from labelcascade.fallback import LinearSVMClassifier, NotFittedError
from labelcascade.prompts import PromptRenderer
from labelcascade.records import Prediction, Source
from labelcascade.retrieval import Embedder, ExampleStore, load_embedder
from labelcascade.task import Task, TaskError
from labelcascade.workspace import Settings, Workspace

Labels = Sequence[str] | Sequence[Sequence[str]]
DEV_FILE = "calibration.npz"  # the dev set as calibration measured it, to choose the policy again after retrains


class Classifier:
    """Classifies texts for one task; see the module docstring for a tour.

    Parameters
    ----------
    task: a `Task`, the path of a task YAML file, or None to take the labels from the first `fit`.
    workspace: folder to keep the state in (must be new or empty); None uses a temporary folder until `save`.
    embedder: 'default' (packaged all-MiniLM-L6-v2), a local sentence-transformers folder, or an `Embedder`.
    engine: the LLM asked when the fallback is unsure: a spec string (default: the embedded Gemma 3 270M through
        llama.cpp; see `agent.engines.load_engine`), an `Engine`, or None for the fallback alone. It is loaded on
        first need; while it cannot answer, answers come from the fallback marked `degraded`.
    policy: thresholds and LLM settings (`agent.Policy`); `calibrate` chooses them from a labelled dev set.
    """

    def __init__(
        self,
        task: Task | str | Path | None = None,
        *,
        workspace: str | Path | None = None,
        embedder: str | Embedder = "default",
        engine: str | Engine | None = DEFAULT_ENGINE,
        policy: Policy | None = None,
    ):
        self._temporary = None if workspace is not None else tempfile.TemporaryDirectory(prefix="labelcascade-")
        self._workspace_path = Path(workspace if workspace is not None else self._temporary.name)
        self.embedder = load_embedder(embedder)
        self._engine = None if engine is None else EngineSlot(engine)
        self._settings = Settings(
            embedder=embedder if isinstance(embedder, str) else self.embedder.id,
            engine=None if self._engine is None else self._engine.spec,
            policy=policy or Policy(),
        )
        self._workspace: Workspace | None = None
        self._store: ExampleStore | None = None
        self._learner: Learner | None = None
        self._cascade: Cascade | None = None
        if task is not None:
            self._start(task if isinstance(task, Task) else Task.from_yaml(task))
            seeds = self._workspace.task.seed_examples()
            if seeds:
                texts, labels = zip(*seeds, strict=True)
                self.add_examples(texts, labels)
                if len(self._store.labels()) >= 2:
                    self.retrain()

    @classmethod
    def open(
        cls, path: str | Path, *, embedder: str | Embedder | None = None, engine: str | Engine | None = "saved"
    ) -> Classifier:
        """Resume from a saved workspace; the embedder must be the one its vectors were made with. The engine is
        the saved one unless another (or None) is given."""
        workspace = Workspace.open(path)
        classifier = cls.__new__(cls)  # not __init__: that starts a new workspace
        classifier._temporary = None
        classifier._workspace_path = workspace.path
        classifier.embedder = load_embedder(embedder if embedder is not None else workspace.settings.embedder)
        if engine == "saved":
            engine = workspace.settings.engine
        classifier._engine = None if engine is None else EngineSlot(engine)
        classifier._cascade = None
        classifier._attach(workspace)
        fallback = workspace.load_fallback()
        if fallback is not None:
            classifier._install(fallback)
        return classifier

    def _start(self, task: Task) -> None:
        self._attach(Workspace.create(self._workspace_path, task, self._settings))

    def _attach(self, workspace: Workspace) -> None:
        self._workspace = workspace
        self._store = workspace.open_store(embedder_id=self.embedder.id, dim=self.embedder.dim)
        self._learner = Learner(
            self._store,
            multi_label=workspace.task.multi_label,
            C=workspace.settings.svm_C,
            save=workspace.save_fallback,
            trained_at=workspace.fallback_trained_at(),
        )
        if self._cascade is not None:  # moved to another folder: same model, new store and learner
            self._install(self._cascade.fallback)

    def _install(self, fallback: LinearSVMClassifier) -> None:
        """Answer with `fallback` from now on, through a cascade wired to this workspace."""
        workspace = self._workspace
        self._cascade = Cascade(
            workspace.task,
            self.embedder,
            fallback,
            store=self._store,
            engine=self._engine,
            renderer=PromptRenderer(workspace.task, workspace.settings.template),
            policy=workspace.settings.policy,
            learner=self._learner,
            on_retrain=self._recalibrate,
        )

    # --- learning -------------------------------------------------------------------------------------------

    def fit(self, texts: Sequence[str], labels: Labels) -> Classifier:
        """Add labelled texts as gold examples and retrain the fallback on everything the workspace holds."""
        if self._workspace is None:
            self._start(Task.from_labels(sorted({label for row in _label_rows(labels) for label in row})))
        self.add_examples(texts, labels)
        return self.retrain()

    def add_examples(
        self,
        texts: Sequence[str],
        labels: Labels,
        *,
        source: Source | str = Source.GOLD,
        confidence: float | Sequence[float] = 1.0,
    ) -> list[int]:
        """Store labelled texts without retraining; returns their ids. A text already stored is not added twice."""
        task = self.task
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings; wrap a single text in a list")
        rows = _label_rows(labels)
        if len(rows) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(rows)} labels; give one label (or list of labels) per text")
        for i, text in enumerate(_checked(texts)):
            if not text.strip():
                raise ValueError(f"row {i}: text is empty")
        task.check_labels(rows)
        return self._store.add(texts, rows, self.embedder.embed(texts), source=source, confidence=confidence)

    def retrain(self) -> Classifier:
        """Train a new fallback on all stored examples (weighted by source) and swap it in."""
        self._started()
        self._install(self._learner.train())
        self._recalibrate()
        return self

    def calibrate(
        self,
        texts: Sequence[str],
        labels: Sequence[str | None] | Sequence[Sequence[str]],
        *,
        target_precision: float = 0.95,
        llm_budget: float | None = None,
        learn_precision: float = 0.85,
        tolerance: float = 0.01,
    ) -> Calibration:
        """Choose the accept, learn and abstain thresholds, the LLM's temperature, weight and candidate count from
        labelled dev texts (not stored), and use them from now on (agent/calibration.py says how). The LLM is asked
        about every dev text once; what it said is kept in the workspace, so the policy is chosen again, without
        the LLM, after every retrain. `llm_budget` caps the share of texts sent to the LLM; `learn_precision` is
        the precision the LLM labels the fallback learns from must keep on the dev texts; `tolerance` is the dev
        accuracy the cascade may give up to send fewer texts to the LLM. After a retrain the best dev accuracy
        reachable now is kept, and what the fallback learned beyond it goes to asking the LLM less. Returns the report;
        `print(report.table())` shows the coverage/precision table."""
        dev = DevSet.measure(
            self._fitted_cascade(), list(texts), list(labels), target_precision=target_precision, llm_budget=llm_budget
        )
        report = choose_policy(
            self._cascade,
            dev,
            target_precision=target_precision,
            llm_budget=llm_budget,
            learn_precision=learn_precision,
            tolerance=tolerance,
        )
        dev.save(self._workspace_path / DEV_FILE)
        self.policy = report.policy
        self._workspace.save_calibration(report)
        return report

    def _recalibrate(self) -> None:
        """After a retrain, choose the policy again for the new fallback on the calibrated dev set (no LLM calls)."""
        previous = self._workspace.load_calibration()
        if previous is None or not (self._workspace_path / DEV_FILE).exists():
            return
        report = choose_policy(
            self._cascade,
            DevSet.load(self._workspace_path / DEV_FILE),
            target_precision=previous.target_precision,
            llm_budget=previous.llm_budget,
            learn_precision=previous.learn_precision,
            tolerance=previous.tolerance,
            accuracy_floor=previous.accuracy_floor,
        )
        report.retrains = previous.retrains + 1
        self.policy = report.policy
        self._workspace.save_calibration(report)

    @property
    def policy(self) -> Policy:
        """The cascade's thresholds and LLM settings, as stored in the workspace."""
        return self._started().settings.policy

    @policy.setter
    def policy(self, policy: Policy) -> None:
        workspace = self._started()
        workspace.settings = workspace.settings.model_copy(update={"policy": policy})
        workspace.save_settings()
        if self._cascade is not None:
            self._cascade.policy = policy

    # --- answering ------------------------------------------------------------------------------------------

    def classify(
        self, texts: str | Sequence[str], *, llm_limit: int | None = None, learn: bool = True
    ) -> Prediction | list[Prediction]:
        """A `Prediction` for one text, or a list of them for a sequence of texts.

        `llm_limit`: send at most this many of the texts to the LLM (the others keep the fallback's answer);
        `learn=False`: do not learn from the LLM's answers (for estimates and dry runs).
        """
        if isinstance(texts, str):
            return self._fitted_cascade().classify(_checked([texts]), llm_limit=llm_limit, learn=learn)[0]
        return self._fitted_cascade().classify(_checked(texts), llm_limit=llm_limit, learn=learn)

    def unsure(self, texts: Sequence[str]) -> np.ndarray:
        """Which texts the cascade would send to the LLM under the current policy (the fallback alone decides;
        nothing is asked). All False when there is no engine or the policy sends nothing to it."""
        cascade = self._fitted_cascade()
        if self._engine is None or not cascade.policy.asks_llm:
            return np.zeros(len(texts), dtype=bool)
        return ~cascade.policy.accepts(cascade.certainty(cascade.probabilities(self.embedder.embed(_checked(texts)))))

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """Probabilities (n_texts, n_labels), columns in `classes_` order."""
        predictions = self.classify(list(texts))
        return np.array([[p.probabilities[label] for label in self.classes_] for p in predictions])

    def predict(self, texts: Sequence[str]) -> np.ndarray:
        """The answer per text; for multi-label tasks an indicator matrix over `classes_`."""
        predictions = self.classify(list(texts))
        if self.task.multi_label:
            return np.array([[label in p.labels for label in self.classes_] for p in predictions], dtype=int)
        return np.array([p.label for p in predictions], dtype=object)

    # --- state ----------------------------------------------------------------------------------------------

    @property
    def task(self) -> Task:
        return self._started().task

    @property
    def classes_(self) -> np.ndarray:
        """All of the task's labels, in task order (labels without examples get probability 0)."""
        return np.array(self.task.label_names)

    @property
    def store(self) -> ExampleStore:
        """The labelled examples this classifier has seen."""
        self._started()
        return self._store

    @property
    def workspace_path(self) -> Path:
        return self._workspace_path

    def answer_cache(self) -> AnswerCache | None:
        """The workspace's cache of LLM answers for this task and engine (None without an engine)."""
        workspace = self._started()
        if self._engine is None:
            return None
        version = task_version(workspace.task, workspace.settings.template)
        return AnswerCache(workspace.path / CACHE_FILE, task_version=version, engine=self._engine.spec)

    def save(self, path: str | Path | None = None) -> Path:
        """Make the workspace durable; with `path`, copy it there (a new or empty folder) and keep working there."""
        self._started()
        self._store.save()
        if path is None or Path(path).resolve() == self._workspace_path.resolve():
            if self._temporary is not None:
                raise ValueError("this classifier lives in a temporary folder: save(path) needs a path")
            return self._workspace_path
        path = Path(path)
        if path.exists() and any(path.iterdir()):
            raise FileExistsError(f"{path}: folder is not empty; save into a new or empty folder")
        self._store.close()
        shutil.copytree(self._workspace_path, path, dirs_exist_ok=True)
        if self._temporary is not None:
            self._temporary.cleanup()
            self._temporary = None
        self._workspace_path = path
        self._attach(Workspace.open(path))
        return path

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
        if self._store is not None:
            self._store.close()
        if self._temporary is not None:
            self._temporary.cleanup()

    def _started(self) -> Workspace:
        """The workspace, which exists once there is a task; before that, an error that says how to start."""
        if self._workspace is None:
            raise NotFittedError("no task yet: pass a task to Classifier() or call fit(texts, labels)")
        return self._workspace

    def _fitted_cascade(self) -> Cascade:
        if self._cascade is None:
            raise NotFittedError(
                "the classifier has no trained fallback yet: call fit(texts, labels) or give the task seed examples "
                "for at least 2 labels"
            )
        return self._cascade

    def __repr__(self) -> str:
        task = self._workspace.task.name if self._workspace else None
        return f"Classifier(task={task!r}, workspace={str(self._workspace_path)!r}, embedder={self.embedder.id!r})"


def _checked(texts: Sequence[str]) -> list[str]:
    """The texts as a list, each a string of valid Unicode; the error names the first that is not."""
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"text {i}: expected a string, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(f"text {i}: not valid Unicode (a lone surrogate at character {error.start})") from None
    return texts


def _label_rows(labels: Labels) -> list[tuple[str, ...]]:
    """One tuple of labels per text, from either one label per text or a sequence of labels per text."""
    if isinstance(labels, str):
        raise TypeError("labels must be a sequence with one label (or list of labels) per text, not a single string")
    rows = [(label,) if isinstance(label, str) else tuple(label) for label in labels]
    for i, row in enumerate(rows):
        if not row or any(not isinstance(label, str) or not label.strip() for label in row):
            raise TaskError(f"row {i}: label is empty or not a string")
    return rows
