"""A workspace: the folder that holds one task's whole state, so a classifier can stop and resume.

    <workspace>/
      task.yaml        the task (labels, descriptions, seed examples)
      settings.json    which embedder made the vectors, index kind, fallback settings, engine, cascade policy
      store/           the example store: examples.sqlite (metadata + vectors) and examples.faiss
      fallback/        the fallback classifier: model.npz + model.json (no pickle)
      body/            with embedder 'tuned' only: the embedding body tuned on the task's examples (safetensors);
                       settings.json records the sha256 of its files, checked before it is loaded; a body tuned
                       again (`Session.retrain(body=True)`) is written beside it as body-<digest>/, and settings.json
                       names the one in use
      calibration.json what the last `calibrate` measured and chose (its policy is copied into settings.json); it is
                       chosen again for a new body or label, from
      calibration.npz  the dev set as `calibrate` measured it: vectors, true labels, the LLM's probabilities
      workspace.lock   an empty file; its advisory lock (flock) guards the fallback folder's swap
      tuning.lock      the same for body retrains: held by one from its start to its swap (`claim_body_lock`), so
                       a second is refused while one tunes; also taken to finish a body swap that was stopped

Several processes may share a workspace (a job learning while a person adds examples). The example store takes
turns through SQLite's own lock (see retrieval/store.py). The fallback model is a folder replaced by renames, which
are not atomic together, so writers hold an exclusive flock on `workspace.lock` while they swap it in, and readers
a shared one while they load it: nobody reads half a swap, and two retrains never tangle their renames. The last
retrain wins; it was trained on everything stored when it started, and nothing stored is ever lost. JSON files are
written to a temporary file and renamed into place, so a reader or a crash sees the old file or the new, never half.
A workspace object remembers which version of task.yaml, settings.json and the fallback model it read or wrote (a
file's inode, size and modification time: every write is a new file renamed into place), so a long-lived session
(the HTTP service) can tell that another process has saved a new one (`changed_elsewhere`) and read it again.

Every write that fails (disk full, read-only) raises WorkspaceError naming the file and what to do, and leaves the
previous state whole; a damaged file is refused on open with the same kind of message, never used.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, ValidationError

from labelcascade.agent.calibration import Calibration
from labelcascade.agent.policy import Policy
from labelcascade.atomic_file import write_text_atomically
from labelcascade.fallback import LinearSVMClassifier
from labelcascade.retrieval import ExampleStore
from labelcascade.retrieval.embedders import TUNED_DIGEST_CHARS, TUNED_EMBEDDER, tuned_body_spec
from labelcascade.retrieval.store import storage_failure
from labelcascade.task import Task

TASK_FILE = "task.yaml"
SETTINGS_FILE = "settings.json"
STORE_DIR = "store"
FALLBACK_DIR = "fallback"
BODY_DIR = "body"
CALIBRATION_FILE = "calibration.json"
LOCK_FILE = "workspace.lock"
BODY_LOCK_FILE = "tuning.lock"  # held by body retrains (`Workspace.claim_body_lock`), apart from the fallback's lock
FALLBACK_MODEL = f"{FALLBACK_DIR}/model.json"  # written last of the model's files (LinearSVMClassifier.save)
WATCHED_FILES = (TASK_FILE, SETTINGS_FILE, FALLBACK_MODEL)  # what a session reads once and may read again
LOCK_FILES = (LOCK_FILE, BODY_LOCK_FILE)  # what copies of a workspace leave out: a lock belongs to its folder


class WorkspaceError(RuntimeError):
    """A workspace folder that is missing, incomplete or damaged."""


class Settings(BaseModel):
    """What a workspace remembers besides its task and data."""

    model_config = ConfigDict(extra="forbid")

    embedder: str = Field("default", description="Embedder spec: 'default' (English), 'multilingual', 'tuned' (the "
                          "body tuned on the task's examples, in the workspace's body/ folder), or a local "
                          "sentence-transformers folder.")
    body_sha256: str | None = Field(None, description="With embedder 'tuned': the sha256 of the tuned body's files, "
                                    "checked before they are loaded.")
    body_dir: str = Field(BODY_DIR, pattern=rf"^{BODY_DIR}(-[0-9a-f]{{{TUNED_DIGEST_CHARS}}})?$", description="With "
                          "embedder 'tuned': the folder of the body in use ('body', or 'body-<digest>' once it was "
                          "tuned again).")
    body_base: Literal["default", "multilingual"] | None = Field(
        None, description="With embedder 'tuned': the packaged body it was tuned from (None in workspaces made "
        "before it was recorded).")
    min_temperature: NonNegativeFloat = Field(
        0.0, description="With embedder 'tuned': the least temperature of the fallback's answers, the one its SVM "
        "fitted over the untuned body on the same examples (the tuned body's own is too low: it was tuned on the "
        "texts that measure it); 0 otherwise.")
    index: str = Field("auto", description="Example index: 'flat' (exact), 'ivf' (approximate) or 'auto' (by size).")
    svm_C: float = Field(1.0, gt=0, description="Inverse regularisation of the fallback SVM.")
    text_features: Literal["auto"] | NonNegativeFloat = Field(
        0.0, description="The weight of the texts' TF-IDF n-grams beside their vectors in the fallback SVM: 'auto' "
        "(chosen by cross-validation at each training; what new workspaces get), a weight, or 0 (none; what "
        "workspaces made before it existed keep).")
    engine: str | None = Field(None, description="LLM engine spec (see agent.engines.load_engine); None: fallback only.")
    template: str = Field("completion", description="Prompt template: 'auto' (the model's chat turns when its engine reads "
                          "a chat template from it, 'completion' otherwise), 'completion', 'chat' or a .j2 file's path.")
    policy: Policy = Field(default_factory=Policy, description="The cascade's thresholds and LLM settings.")


class Workspace:
    """Reads and writes the files of one workspace folder."""

    def __init__(self, path: Path, task: Task, settings: Settings, *, new: bool = False,
                 seen: dict[str, FileVersion] | None = None):
        """`new`: made by `create` in this process, so its example store is still to be made; every other
        workspace must have one, and a missing or empty one is refused, never made anew over the examples lost.
        `seen`: the versions of the watched files (`WATCHED_FILES`) as they were before `task` and `settings` were
        read from them."""
        self.path = path
        self.task = task
        self.settings = settings
        self.new = new
        self._seen = dict(seen) if seen is not None else {}

    @classmethod
    def create(cls, path: str | Path, task: Task, settings: Settings | None = None) -> Workspace:
        """Start a workspace in an empty or new folder."""
        path = Path(path)
        if path.exists() and any(path.iterdir()):
            raise WorkspaceError(f"{path}: folder is not empty; open it with Session.open() or choose a new folder")
        workspace = cls(path, task, settings or Settings(), new=True)
        try:
            path.mkdir(parents=True, exist_ok=True)
            task.to_yaml(path / TASK_FILE)
        except OSError as error:
            raise WorkspaceError(storage_failure(path, error, "create the workspace")) from None
        workspace._seen = _versions(path)
        workspace.save_settings()
        return workspace

    @classmethod
    def open(cls, path: str | Path) -> Workspace:
        path = Path(path)
        if not (path / TASK_FILE).is_file():
            raise WorkspaceError(f"{path}: not a labelcascade workspace ({TASK_FILE} missing)")
        parts = sorted(path.iterdir())  # every file and folder of the workspace, and what its folders hold
        for folder in [path / STORE_DIR, path / FALLBACK_DIR, *path.glob(f"{BODY_DIR}*")]:
            if folder.is_dir() and not folder.is_symlink():
                parts += sorted(folder.iterdir())
        for part in parts:
            if part.is_symlink():
                raise WorkspaceError(
                    f"{part}: a symbolic link; a workspace's files must be its own (they are replaced by "
                    "renames, which would break the link or write through it): put the file or folder it points to "
                    "in its place"
                )
        seen = _versions(path)  # before reading: a file replaced while it is read shows as changed afterwards
        task = Task.from_yaml(path / TASK_FILE)
        try:
            settings = Settings.model_validate_json((path / SETTINGS_FILE).read_bytes())
        except FileNotFoundError:
            raise WorkspaceError(f"{path}: {SETTINGS_FILE} missing") from None
        except ValidationError as error:
            raise WorkspaceError(
                f"{path / SETTINGS_FILE}: invalid settings: {error.errors()[0]['msg']}; fix the file (or copy it "
                "from a backup): it holds the embedder, engine and thresholds"
            ) from None
        return cls(path, task, settings, seen=seen)

    def changed_elsewhere(self) -> bool:
        """Whether another process has saved task.yaml, settings.json or the fallback model since this object read
        or wrote them (a few stat calls: cheap enough to ask before every batch)."""
        return _versions(self.path) != self._seen

    def save_task(self, task: Task) -> None:
        """Replace the task (task.yaml, atomically): only ever by one that keeps the old labels' names and order."""
        self._seen[TASK_FILE] = _version(_write_atomically(self.path / TASK_FILE, task.yaml_text()))
        self.task = task

    def save_settings(self) -> None:
        written = _write_atomically(self.path / SETTINGS_FILE, self.settings.model_dump_json(indent=2))
        self._seen[SETTINGS_FILE] = _version(written)

    @property
    def embedder_spec(self) -> str:
        """The spec that loads this workspace's embedder (`retrieval.load_embedder`): the recorded one, or for a tuned
        body its folder here and the digest its files must match."""
        if self.settings.embedder != TUNED_EMBEDDER:
            return self.settings.embedder
        if not self.settings.body_sha256:
            raise WorkspaceError(f"{self.path / SETTINGS_FILE}: embedder 'tuned' but no body_sha256; the workspace was "
                                 "not finished (its tuning stopped?): create it again")
        return tuned_body_spec(self.path / self.settings.body_dir, self.settings.body_sha256)

    def open_store(self, *, embedder_id: str, dim: int) -> ExampleStore:
        """The example store, created with the workspace and only then; refuses vectors from another embedder."""
        return ExampleStore(
            self.path / STORE_DIR, embedder_id=embedder_id, dim=dim, index=self.settings.index, create=self.new
        )

    def load_fallback(self) -> LinearSVMClassifier | None:
        """The saved fallback classifier, or None before the first training; WorkspaceError if it is damaged."""
        with self._locked(exclusive=False):
            folder = self._recover_fallback()
            if not folder.exists():
                return None
            try:
                return LinearSVMClassifier.load(folder)
            except (ValueError, FileNotFoundError) as error:
                raise WorkspaceError(
                    f"{error}; delete the folder {folder} and run `labelcascade retrain {self.path}` to train it "
                    "again from the stored examples"
                ) from None

    def save_fallback(self, model: LinearSVMClassifier) -> None:
        """Write the model beside the current one, then swap, so a crash or a full disk never leaves half a model."""
        with self._locked(exclusive=True):
            folder = self._recover_fallback()
            new, old = folder.with_name(FALLBACK_DIR + ".new"), folder.with_name(FALLBACK_DIR + ".old")
            try:
                shutil.rmtree(new, ignore_errors=True)
                model.save(new)
            except OSError as error:
                shutil.rmtree(new, ignore_errors=True)  # give the space back; the current model is untouched
                raise WorkspaceError(storage_failure(new, error, "save the retrained fallback model")) from None
            if folder.exists():
                folder.rename(old)
                new.rename(folder)
                shutil.rmtree(old)
            else:
                new.rename(folder)
            self._seen[FALLBACK_MODEL] = _version_of(self.path / FALLBACK_MODEL)  # no other writer: the lock is held

    def fallback_trained_at(self) -> float | None:
        """When the current fallback was written (epoch seconds), or None before the first training."""
        with self._locked(exclusive=False):
            model = self._recover_fallback() / "model.json"
            return model.stat().st_mtime if model.exists() else None

    def save_calibration(self, calibration: Calibration) -> None:
        """Keep the report of the last calibration (its policy goes into the settings separately)."""
        _write_atomically(self.path / CALIBRATION_FILE, calibration.model_dump_json(indent=2))

    def load_calibration(self) -> Calibration | None:
        path = self.path / CALIBRATION_FILE
        try:
            return Calibration.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            return None
        except ValidationError as error:
            raise WorkspaceError(
                f"{path}: damaged or invalid ({error.errors()[0]['msg']}); delete it and run `labelcascade "
                f"calibrate {self.path} DEV_FILE` again (the thresholds in use are in {SETTINGS_FILE})"
            ) from None

    @contextmanager
    def body_lock(self) -> Iterator[Settings]:
        """Hold the body retrains' lock (waiting for a body retrain that holds it: `claim_body_lock`), and yield the
        settings as saved now (another process may have swapped a body in since these were read)."""
        claim = self.claim_body_lock(wait=True)
        try:
            yield self.saved_settings()
        finally:
            claim.release()

    def claim_body_lock(self, *, wait: bool = False) -> BodyLockClaim:
        """The body retrains' lock, taken now for as long as one body retrain runs, or WorkspaceError if another
        holds it (`wait`: until it lets go). Why held so long: a body retrain clears stray body folders when it
        starts, and tunes for minutes before its swap; a second one started meanwhile would clear the first one's
        new body as a stray."""
        lock_path = self.path / BODY_LOCK_FILE
        try:
            handle = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise WorkspaceError(storage_failure(lock_path, error, "lock the workspace")) from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(handle)
            raise WorkspaceError(f"{self.path}: another body retrain is running on this workspace (a `labelcascade "
                                 "retrain --body`, a service's or another session's); retrain after it ends") from None
        return BodyLockClaim(handle)

    def saved_settings(self) -> Settings:
        """settings.json as saved now, read again (these `settings` are as this workspace was opened)."""
        try:
            return Settings.model_validate_json((self.path / SETTINGS_FILE).read_bytes())
        except (OSError, ValidationError) as error:
            raise WorkspaceError(f"{self.path / SETTINGS_FILE}: cannot be read again: {error}") from None

    @contextmanager
    def _locked(self, *, exclusive: bool) -> Iterator[None]:
        """Hold the workspace's advisory lock: exclusive to change the fallback folder, shared to read it.

        A read-only workspace that has never been locked cannot get a lock file, and needs none: nobody can
        change it."""
        lock_path = self.path / LOCK_FILE
        try:
            handle = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            try:
                handle = os.open(lock_path, os.O_RDONLY)
            except FileNotFoundError:
                if exclusive:
                    raise WorkspaceError(storage_failure(lock_path, error, "lock the workspace")) from None
                yield
                return
        try:
            fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(handle)  # closing releases the lock

    def _recover_fallback(self) -> Path:
        """Finish a swap that a crash interrupted: the previous model in `.old` is whole, a `.new` may not be."""
        folder = self.path / FALLBACK_DIR
        old = folder.with_name(FALLBACK_DIR + ".old")
        if old.exists():
            if folder.exists():
                shutil.rmtree(old)
            else:
                old.rename(folder)
        return folder


FileVersion = tuple[int, int, int] | None  # a file's inode, size and modification time (ns); None: no such file


def _version(status: os.stat_result) -> FileVersion:
    return status.st_ino, status.st_size, status.st_mtime_ns


def _version_of(path: Path) -> FileVersion:
    try:
        return _version(path.stat())
    except FileNotFoundError:
        return None


def _versions(path: Path) -> dict[str, FileVersion]:
    """The versions of a workspace's watched files now (one missing while another process swaps it in shows as
    None: a change, read again once the swap is done)."""
    return {name: _version_of(path / name) for name in WATCHED_FILES}


def _write_atomically(path: Path, text: str) -> os.stat_result:
    """`path` is the old file or the new one, whatever happens; a failed write names the file and what to do."""
    try:
        return write_text_atomically(path, text)
    except OSError as error:
        raise WorkspaceError(storage_failure(path, error, f"write {path.name}")) from None


class BodyLockClaim:
    """The body retrains' lock (tuning.lock), held by one body retrain from its start to its swap
    (`Workspace.claim_body_lock`). An advisory lock (flock) on an open file: it is released by `release`, by the
    claim being garbage-collected, or by its process dying, so a killed retrain never leaves the workspace locked."""

    def __init__(self, handle: int):
        self._release = weakref.finalize(self, os.close, handle)  # closing the file releases the lock

    @property
    def held(self) -> bool:
        return self._release.alive

    def release(self) -> None:
        self._release()  # once; later calls do nothing
