"""A cache of the LLM's answers, so that labelling the same texts again costs no LLM call.

An answer is keyed by the text and a version of everything else that shapes it (`Session.answer_version`): the
task and prompt template, the engine, the policy and the fallback model. A calibration or a retrain changes the
version, so the answers kept before it are computed again rather than returned stale. Only answers the LLM gave
are kept: fallback answers are cheap, and degraded answers are exactly the ones to ask again once the engine is
back.

The cache is an SQLite file in the workspace, shared by every job (and process) that uses the workspace; SQLite's
lock lets them take turns. A write that fails (disk full, read-only) or a damaged file is a WorkspaceError naming
the file: the cache is only a cache, so deleting a damaged one loses nothing but LLM time.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from labelcascade.records import Prediction, Route
from labelcascade.retrieval.store import storage_failure
from labelcascade.task import Task
from labelcascade.workspace import WorkspaceError

CACHE_FILE = "answers.sqlite"


def task_version(task: Task, template: str) -> str:
    """A digest of everything that defines the question asked of the LLM: the task, and the prompt template (its
    text, when it is a file)."""
    if template.endswith(".j2") and Path(template).is_file():
        template = Path(template).read_text(encoding="utf-8")
    definition = json.dumps({"task": task.model_dump(mode="json"), "template": template}, sort_keys=True)
    return hashlib.sha256(definition.encode()).hexdigest()[:16]


class AnswerCache:
    """LLM answers by (text, answer version)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with self._failures("open the answer cache"):
            self._db = sqlite3.connect(self.path, timeout=30)
            with self._db:
                self._db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, prediction TEXT NOT NULL)")

    @contextmanager
    def _failures(self, doing: str) -> Iterator[None]:
        """SQLite's errors as one-line WorkspaceErrors that name the file and what to do."""
        try:
            yield
        except sqlite3.DatabaseError as error:
            if isinstance(error, sqlite3.OperationalError):
                raise WorkspaceError(storage_failure(self.path, error, doing)) from None
            raise WorkspaceError(f"{self.path}: the answer cache is damaged ({error}); delete it (it only saves LLM "
                                 "calls) and run the command again") from None

    @staticmethod
    def _key(version: str, text: str) -> str:
        return hashlib.sha256(f"{version}\0{text}".encode()).hexdigest()

    def get(self, texts: Sequence[str], version: str) -> dict[int, Prediction]:
        """The answers kept for these texts under `version` (`Session.answer_version()`), by position in `texts`."""
        found = {}
        with self._failures("read the answer cache"):
            for i, text in enumerate(texts):
                row = self._db.execute("SELECT prediction FROM answers WHERE key = ?", (self._key(version, text),)).fetchone()
                if row is not None:
                    found[i] = Prediction.model_validate_json(row[0])
        return found

    def put(self, texts: Sequence[str], predictions: Sequence[Prediction], version: str) -> None:
        """Keep the answers the LLM gave, made under `version`; others are ignored."""
        rows = [(self._key(version, text), p.model_dump_json()) for text, p in zip(texts, predictions, strict=True)
                if p.route is Route.LLM]
        with self._failures("keep the LLM's answers"), self._db:
            self._db.executemany("INSERT OR REPLACE INTO answers (key, prediction) VALUES (?, ?)", rows)

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]

    def close(self) -> None:
        self._db.close()
