"""A workspace: the folder that holds one task's whole state, so a classifier can stop and resume.

    <workspace>/
      task.yaml        the task (labels, descriptions, seed examples)
      settings.json    which embedder made the vectors, index kind, fallback settings, engine, cascade policy
      store/           the example store: examples.sqlite (metadata + vectors) and examples.faiss
      fallback/        the fallback classifier: model.npz + model.json (no pickle)
      calibration.json what the last `calibrate` measured and chose (its policy is copied into settings.json)
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from labelcascade.agent.calibration import Calibration
from labelcascade.agent.policy import Policy
from labelcascade.fallback import LinearSVMClassifier
from labelcascade.retrieval import ExampleStore
from labelcascade.task import Task

TASK_FILE = "task.yaml"
SETTINGS_FILE = "settings.json"
STORE_DIR = "store"
FALLBACK_DIR = "fallback"
CALIBRATION_FILE = "calibration.json"


class WorkspaceError(RuntimeError):
    """A workspace folder that is missing, incomplete or damaged."""


class Settings(BaseModel):
    """What a workspace remembers besides its task and data."""

    model_config = ConfigDict(extra="forbid")

    embedder: str = Field("default", description="Embedder spec: 'default' or a local sentence-transformers folder.")
    index: str = Field("auto", description="Example index: 'flat' (exact), 'ivf' (approximate) or 'auto' (by size).")
    svm_C: float = Field(1.0, gt=0, description="Inverse regularisation of the fallback SVM.")
    engine: str | None = Field(None, description="LLM engine spec (see agent.engines.load_engine); None: fallback only.")
    template: str = Field("completion", description="Prompt template: 'completion', 'chat' or the path of a .j2 file.")
    policy: Policy = Field(default_factory=Policy, description="The cascade's thresholds and LLM settings.")


class Workspace:
    """Reads and writes the files of one workspace folder."""

    def __init__(self, path: Path, task: Task, settings: Settings):
        self.path = path
        self.task = task
        self.settings = settings

    @classmethod
    def create(cls, path: str | Path, task: Task, settings: Settings | None = None) -> Workspace:
        """Start a workspace in an empty or new folder."""
        path = Path(path)
        if path.exists() and any(path.iterdir()):
            raise WorkspaceError(f"{path}: folder is not empty; open it with Classifier.open() or choose a new folder")
        path.mkdir(parents=True, exist_ok=True)
        workspace = cls(path, task, settings or Settings())
        task.to_yaml(path / TASK_FILE)
        workspace.save_settings()
        return workspace

    @classmethod
    def open(cls, path: str | Path) -> Workspace:
        path = Path(path)
        if not (path / TASK_FILE).is_file():
            raise WorkspaceError(f"{path}: not a labelcascade workspace ({TASK_FILE} missing)")
        task = Task.from_yaml(path / TASK_FILE)
        try:
            settings = Settings.model_validate_json((path / SETTINGS_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise WorkspaceError(f"{path}: {SETTINGS_FILE} missing") from None
        except ValidationError as error:
            raise WorkspaceError(f"{path / SETTINGS_FILE}: invalid settings: {error.errors()[0]['msg']}") from None
        return cls(path, task, settings)

    def save_settings(self) -> None:
        (self.path / SETTINGS_FILE).write_text(self.settings.model_dump_json(indent=2), encoding="utf-8")

    def open_store(self, *, embedder_id: str, dim: int) -> ExampleStore:
        """The example store, created on first use; refuses vectors from another embedder."""
        return ExampleStore(self.path / STORE_DIR, embedder_id=embedder_id, dim=dim, index=self.settings.index)

    def load_fallback(self) -> LinearSVMClassifier | None:
        """The saved fallback classifier, or None before the first training."""
        folder = self._recover_fallback()
        return LinearSVMClassifier.load(folder) if folder.exists() else None

    def save_fallback(self, model: LinearSVMClassifier) -> None:
        """Write the model beside the current one, then swap, so a crash never leaves half a model."""
        folder = self._recover_fallback()
        new, old = folder.with_name(FALLBACK_DIR + ".new"), folder.with_name(FALLBACK_DIR + ".old")
        shutil.rmtree(new, ignore_errors=True)
        model.save(new)
        if folder.exists():
            folder.rename(old)
            new.rename(folder)
            shutil.rmtree(old)
        else:
            new.rename(folder)

    def fallback_trained_at(self) -> float | None:
        """When the current fallback was written (epoch seconds), or None before the first training."""
        model = self._recover_fallback() / "model.json"
        return model.stat().st_mtime if model.exists() else None

    def save_calibration(self, calibration: Calibration) -> None:
        """Keep the report of the last calibration (its policy goes into the settings separately)."""
        (self.path / CALIBRATION_FILE).write_text(calibration.model_dump_json(indent=2), encoding="utf-8")

    def load_calibration(self) -> Calibration | None:
        path = self.path / CALIBRATION_FILE
        return Calibration.model_validate_json(path.read_text(encoding="utf-8")) if path.exists() else None

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
