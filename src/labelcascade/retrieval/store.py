"""The example store: labelled examples kept for few-shot retrieval and for training the fallback.

SQLite is the source of truth for everything, vectors included (float32 blobs), so the store survives any loss of
the vector index (vector_index.py, FAISS): `examples.faiss` is only a search structure, written next to the
database on `save()` and rebuilt from SQLite whenever it is missing or does not hold exactly the ids the database
holds. This module is the database and keeps the index in step with it; the index knows nothing of SQLite. Ids are
SQLite row ids and double as FAISS ids; they are never reused, so an id quoted in an old prediction never points at
another example.

Vectors are stored L2-normalised and searched by inner product, so every score is a cosine similarity.

Several processes may use one store at once (a labelling job learning while a person adds examples). SQLite's own
lock is the only lock: every change is one `BEGIN IMMEDIATE` transaction, committed before `add` or `remove`
returns, so writers take turns, a text is checked and inserted in one step (never stored twice, never lost), and a
disk-full or read-only error leaves the database as it was. Each process keeps its own FAISS index in memory and
brings it up to date (`PRAGMA data_version`) whenever another connection has committed since it last looked, before
it searches, changes or saves. The FAISS file is written inside the same write transaction, so the file on disk
always matches the database as of its writing, and its sha256 is recorded beside it in the database.

Damage: opening runs SQLite's `quick_check`, so a truncated or overwritten database is a `StoreError` that names
the file, not a source of wrong answers. A FAISS file whose sha256 differs from the recorded one, that FAISS cannot
read, or that holds other ids than the database is rebuilt from the database, which holds every vector: losing it
costs a rebuild, never an example. (SQLite keeps no checksum of the values themselves, so a flipped bit inside a
stored vector or text is beyond what it can detect.)
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import numbers
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np

from labelcascade.atomic_file import write_bytes_atomically
from labelcascade.records import Example, Neighbor, Source
from labelcascade.retrieval import vector_index
from labelcascade.retrieval.vector_index import VectorIndex

log = logging.getLogger(__name__)

DB_FILE = "examples.sqlite"
INDEX_FILE = "examples.faiss"
INDEX_KINDS = vector_index.INDEX_KINDS
SCHEMA_VERSION = "1"  # recorded in every store so that a later layout can recognise and migrate this one

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS examples (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: ids of removed examples are never handed out again
    text TEXT NOT NULL UNIQUE,
    labels TEXT NOT NULL,                  -- JSON list, in the order given
    source TEXT NOT NULL,
    confidence REAL NOT NULL,
    created_at REAL NOT NULL,
    vector BLOB NOT NULL                   -- little-endian float32, unit length
);
CREATE TABLE IF NOT EXISTS example_labels (
    example_id INTEGER NOT NULL REFERENCES examples(id),
    label TEXT NOT NULL,
    PRIMARY KEY (example_id, label)
);
CREATE INDEX IF NOT EXISTS example_labels_by_label ON example_labels(label);
"""

LOCK_TIMEOUT_S = 60  # how long a writer waits for another process's write transaction before giving up
_VECTOR_DTYPE = np.dtype("<f4")
_EXAMPLE_COLUMNS = "id, text, labels, source, confidence, created_at"


class EmbedderMismatchError(ValueError):
    """Vectors from two different embedders are not comparable, so one store never mixes them."""


class StoreError(ValueError):
    """The store's files are damaged, or cannot be written (disk full, read-only); the message names the file and
    says what to do. A ValueError, like the store's other refusals, so that front doors report it in one line."""


class TrainingData(NamedTuple):
    """Every stored example, in id order, as the fallback is trained on them."""

    vectors: np.ndarray
    labels: list[tuple[str, ...]]
    sources: list[Source]
    confidences: np.ndarray
    texts: list[str]


class ExampleStore:
    """Labelled examples with their embeddings, searchable by cosine similarity.

    `add` and `remove` are durable when they return; `save()` (or leaving a `with` block, or `close()`) also
    writes the FAISS file, which only saves the rebuild on the next open.
    """

    def __init__(
        self, path: str | Path | None, *, embedder_id: str, dim: int, index: str = "flat", create: bool = True
    ):
        """Create a store, or open the one already in `path` (a folder; None keeps everything in memory).

        `create=False` opens a store that must exist: a missing database, or a file that holds no store (empty,
        or another database), is a StoreError, and nothing is written over it.

        `index` is "flat" (exact), "ivf" (approximate, for large stores) or "auto" (flat below
        APPROX_INDEX_MIN_SIZE examples, ivf from there on). Opening an existing store with another `index` switches
        it to that kind; the embedder id and dimension, by contrast, must match what the store was built with.
        """
        if index not in INDEX_KINDS:
            raise ValueError(f"index must be one of {', '.join(INDEX_KINDS)}, not {index!r}")
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer, not {dim!r}")
        self.embedder_id = embedder_id
        self.dim = dim
        self.index_kind = index
        self.path = None if path is None else Path(path)
        self._lock = threading.RLock()  # one store may serve several threads; FAISS adds and SQLite need turns
        self._ids_by_label_cache: dict[str, np.ndarray] | None = None
        self._index: VectorIndex | None = None  # loaded once the database is known to be whole
        self._data_version: int | None = None  # SQLite's count of other connections' commits, when last followed

        database = ":memory:" if self.path is None else str(self.path / DB_FILE)
        lost = (f"{database}: {{}}; it holds the workspace's examples and is never made anew over them: restore it "
                "from a backup, or start a new workspace and add the examples again")
        if not create and self.path is not None and not (self.path / DB_FILE).is_file():
            raise StoreError(lost.format("missing"))
        try:
            if self.path is not None:
                self.path.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: no implicit transactions; every change is an explicit BEGIN IMMEDIATE (see
            # _writing), so the write lock is held only while a change is made, never between calls.
            self._db = sqlite3.connect(database, check_same_thread=False, isolation_level=None, timeout=LOCK_TIMEOUT_S)
        except (OSError, sqlite3.Error) as error:
            raise StoreError(storage_failure(database, error, "open the example store")) from None
        try:
            self._check_integrity()
            if self._db.execute("SELECT COUNT(*) FROM sqlite_master WHERE name = 'examples'").fetchone()[0] == 0:
                if not create:
                    raise StoreError(lost.format("holds no example store (it is empty, or another database)"))
                with self._writing("create the example store"):
                    for statement in filter(str.strip, _SCHEMA.split(";")):  # not executescript: it commits
                        self._db.execute(statement)
            self._check_or_record_meta()
            self._data_version = self._current_data_version()
            self._index, self._index_dirty = self._load_or_rebuild_index()
        except BaseException:
            self._db.close()
            raise

    @classmethod
    def open(cls, path: str | Path, *, embedder_id: str | None = None) -> ExampleStore:
        """Reopen an existing store with the embedder, dimension and index kind it was built with.

        Passing `embedder_id` makes sure the caller's embedder is the one the stored vectors came from.
        """
        folder = Path(path)
        if not (folder / DB_FILE).is_file():
            raise FileNotFoundError(
                f"no example store in {folder} (no {DB_FILE}); create one with "
                "ExampleStore(path, embedder_id=..., dim=...)"
            )
        db = sqlite3.connect(str(folder / DB_FILE))
        try:
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as error:
            raise StoreError(f"{folder / DB_FILE} is not an example store database: {error}") from error
        finally:
            db.close()
        if not {"embedder_id", "dim", "index_kind"} <= meta.keys():
            raise ValueError(f"{folder / DB_FILE} is not an example store database (its meta table is incomplete)")
        if embedder_id is not None and embedder_id != meta["embedder_id"]:
            raise EmbedderMismatchError(_mismatch_message(folder, meta["embedder_id"], int(meta["dim"]), embedder_id))
        return cls(folder, embedder_id=meta["embedder_id"], dim=int(meta["dim"]), index=meta["index_kind"])

    # ----------------------------------------------------------------------------------------------- writing

    def add(
        self,
        texts: Sequence[str],
        labels: Sequence[Sequence[str]] | Sequence[str],
        vectors: np.ndarray,
        *,
        source: Source | str = Source.GOLD,
        confidence: float | Sequence[float] = 1.0,
    ) -> list[int]:
        """Store labelled texts and return the id of each; a text already stored keeps its id.

        A text is stored once. When it comes again, its labels, source and confidence are replaced only if the new
        source ranks at least as high as the stored one (review > gold > llm), so an LLM label never overwrites a
        person's. Its vector and creation time stay: the text, and therefore its embedding, is the same.
        """
        source = _as_source(source)
        rows = _validated_rows(texts, labels, vectors, confidence, self.dim)
        if not rows:
            return []
        with self._writing("store examples"):
            known = self._known_texts([text for text, *_ in rows])
            ids: list[int] = []
            new_ids: list[int] = []
            new_vectors: list[np.ndarray] = []
            now = time.time()
            for text, row_labels, vector, row_confidence in rows:
                if text in known:
                    example_id, stored_source = known[text]
                    if source.rank >= stored_source.rank:
                        self._replace_labels(example_id, row_labels, source, row_confidence)
                        known[text] = (example_id, source)
                    ids.append(example_id)
                    continue
                example_id = self._db.execute(
                    "INSERT INTO examples (text, labels, source, confidence, created_at, vector)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (text, json.dumps(row_labels), source.value, row_confidence, now, vector.tobytes()),
                ).lastrowid
                self._db.executemany(
                    "INSERT INTO example_labels (example_id, label) VALUES (?, ?)",
                    [(example_id, label) for label in row_labels],
                )
                known[text] = (example_id, source)
                ids.append(example_id)
                new_ids.append(example_id)
                new_vectors.append(vector)
            self._ids_by_label_cache = None
            if new_ids:
                self._index_new(np.array(new_ids, dtype=np.int64), np.stack(new_vectors))
            return ids

    def remove(self, ids: Iterable[int]) -> int:
        """Delete examples by id and return how many were there; unknown ids are ignored."""
        wanted = sorted({int(i) for i in ids})
        with self._writing("remove examples"):
            present = [
                row[0]
                for row in self._db.execute(
                    "SELECT id FROM examples WHERE id IN (SELECT value FROM json_each(?))", (json.dumps(wanted),)
                )
            ]
            if not present:
                return 0
            doomed = (json.dumps(present),)
            self._db.execute("DELETE FROM example_labels WHERE example_id IN (SELECT value FROM json_each(?))", doomed)
            self._db.execute("DELETE FROM examples WHERE id IN (SELECT value FROM json_each(?))", doomed)
            self._ids_by_label_cache = None
            self._index.remove(np.array(present, dtype=np.int64))
            self._index_dirty = True
            if not self._index.fits(len(self), self.dim):
                self._rebuild_index()
            return len(present)

    def reembed(self, embedder_id: str, embed: Callable[[list[str]], np.ndarray],
                known: dict[str, np.ndarray] | None = None) -> None:
        """Give every example a vector from another embedder (of the same dimension: a retuned body) and record
        that embedder, in one write transaction: other connections see the old vectors and id, or the new ones,
        never a mix. `known`: vectors already computed, by text; `embed` makes the rest (texts stored since). A
        connection still on the old embedder is refused its next read or write (`EmbedderMismatchError`)."""
        with self._writing("store the re-embedded examples"):
            rows = self._db.execute("SELECT id, text FROM examples ORDER BY id").fetchall()
            known = dict(known or {})
            missing = [text for _, text in rows if text not in known]
            if missing:
                known.update(zip(missing, np.asarray(embed(missing)), strict=True))
            vectors = _unit_rows([known[text] for _, text in rows] if rows else np.empty((0, self.dim)), self.dim,
                                 "re-embedded")
            self._db.executemany("UPDATE examples SET vector = ? WHERE id = ?",
                                 [(vector.tobytes(), row[0]) for vector, row in zip(vectors, rows, strict=True)])
            self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('embedder_id', ?)", (embedder_id,))
            self.embedder_id = embedder_id
            self._rebuild_index()

    def save(self) -> None:
        """Write the FAISS file, if it changed, in one atomic rename inside a write transaction that also records
        its sha256, so the file matches the database as of now; a crash in between leaves a file whose sha256 does
        not match, which the next open rebuilds."""
        with self._lock:
            if self.path is None:
                return
            self._follow_other_writers()
            if not self._index_dirty:
                return
            index_file = self.path / INDEX_FILE
            with self._writing("save the FAISS index"):
                content = self._index.to_bytes()
                write_bytes_atomically(index_file, content)
                digest = _sha256(content)
                self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('index_sha256', ?)", (digest,))
            self._index_dirty = False

    def close(self) -> None:
        """Save and release the database; closing twice is harmless."""
        with self._lock:
            if self._db is None:
                return
            try:
                self.save()
            except EmbedderMismatchError:
                pass  # re-embedded by another connection: this one's index is of the old vectors, nothing to save
            finally:
                self._db.close()
                self._db = None

    def __enter__(self) -> ExampleStore:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ----------------------------------------------------------------------------------------------- reading

    def search(
        self,
        vectors: np.ndarray,
        k: int = 8,
        *,
        labels: Iterable[str] | None = None,
        sources: Iterable[Source | str] | None = None,
        balanced: bool = False,
    ) -> list[list[Neighbor]]:
        """Return, for each query row, up to `k` stored examples by decreasing cosine similarity.

        `labels` keeps only examples carrying at least one of these labels, `sources` only examples from these
        sources. `balanced` spreads the `k` results over
        the labels (the given ones, or all), so the LLM sees every candidate label rather than `k` near-copies of
        the most common one: each label gets up to ceil(k / labels) of its best, dealt round by round, and the
        best of the rest fill any room left. With more labels than `k`, the `k` labels whose best example scores
        highest get one each.
        """
        queries = _unit_rows(vectors, self.dim, "query")
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, not {k!r}")
        with self._lock:
            self._follow_other_writers()
            by_label = self._ids_by_label()
            if labels is not None:
                wanted = {labels} if isinstance(labels, str) else set(labels)
                by_label = {label: ids for label, ids in by_label.items() if label in wanted}
            if sources is not None:
                kept = self._ids_from(sources)
                by_label = {label: ids[np.isin(ids, kept)] for label, ids in by_label.items()}
                by_label = {label: ids for label, ids in by_label.items() if len(ids)}
            if not by_label:
                return [[] for _ in queries]
            filtered = labels is not None or sources is not None
            allowed = np.unique(np.concatenate(list(by_label.values()))) if filtered else None
            if balanced:
                hits = self._index.balanced_search(queries, k, by_label, allowed)
            else:
                hits = self._index.search(queries, k, allowed)
            return self._neighbors(hits)

    def find(self, texts: Sequence[str]) -> dict[str, Example]:
        """The stored examples of these exact texts, by text (texts not stored are left out)."""
        with self._lock:
            known = self._known_texts(list(texts))
            found = self._examples_by_id([example_id for example_id, _ in known.values()])
        return {text: found[example_id] for text, (example_id, _) in known.items()}

    def count_stored(self, texts: Sequence[str]) -> int:
        """How many of `texts` are stored as examples, outer spaces ignored (a task's seed examples are stored
        stripped): dev or test texts the fallback was trained on."""
        found = self.find(list({*texts, *(text.strip() for text in texts)}))
        return sum(text in found or text.strip() in found for text in texts)

    def get(self, ids: Sequence[int]) -> list[Example]:
        """Return the examples with these ids, in the order asked; KeyError names any id not stored."""
        wanted = [int(i) for i in ids]
        with self._lock:
            found = self._examples_by_id(wanted)
        missing = [i for i in wanted if i not in found]
        if missing:
            raise KeyError(f"no stored example with id {', '.join(map(str, missing))}")
        return [found[i] for i in wanted]

    def examples(self, source: Source | str | None = None) -> list[Example]:
        """All examples in insertion order, optionally only those from one source."""
        query = f"SELECT {_EXAMPLE_COLUMNS} FROM examples"
        parameters: tuple = ()
        if source is not None:
            query += " WHERE source = ?"
            parameters = (_as_source(source).value,)
        with self._lock:
            return [_example(row) for row in self._db.execute(query + " ORDER BY id", parameters)]

    def training_data(self) -> TrainingData:
        """Vectors, labels, sources, confidences and texts of every example, in id order, for training the fallback."""
        with self._lock:
            rows = self._db.execute("SELECT vector, labels, source, confidence, text FROM examples ORDER BY id").fetchall()
        vectors = np.empty((len(rows), self.dim), dtype=np.float32)
        for position, row in enumerate(rows):
            vectors[position] = np.frombuffer(row[0], dtype=_VECTOR_DTYPE)
        labels = [tuple(json.loads(row[1])) for row in rows]
        sources = [Source(row[2]) for row in rows]
        confidences = np.array([row[3] for row in rows], dtype=np.float64)
        return TrainingData(vectors, labels, sources, confidences, [row[4] for row in rows])

    def count(self, source: Source | str | None = None, *, since: float | None = None) -> int:
        """How many examples there are, optionally only from one source and created after `since` (epoch seconds)."""
        query, parameters = "SELECT COUNT(*) FROM examples WHERE 1", []
        if source is not None:
            query += " AND source = ?"
            parameters.append(_as_source(source).value)
        if since is not None:
            query += " AND created_at > ?"
            parameters.append(since)
        with self._lock:
            return self._db.execute(query, parameters).fetchone()[0]

    def labels(self) -> list[str]:
        """The distinct labels of the stored examples, sorted."""
        with self._lock:
            self._follow_other_writers()
            return sorted(self._ids_by_label())

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM examples").fetchone()[0]

    def __repr__(self) -> str:
        where = "in memory" if self.path is None else str(self.path)
        return f"ExampleStore({where}, embedder_id={self.embedder_id!r}, dim={self.dim}, index={self.index_kind!r})"

    # ----------------------------------------------------------------------------------------------- internals

    def _check_or_record_meta(self) -> None:
        meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        if meta:
            if meta.get("embedder_id") != self.embedder_id or int(meta.get("dim", -1)) != self.dim:
                stored_id, stored_dim = meta.get("embedder_id"), int(meta.get("dim", -1))
                raise EmbedderMismatchError(
                    _mismatch_message(self.path, stored_id, stored_dim, self.embedder_id, self.dim)
                )
        else:
            meta = {"schema_version": SCHEMA_VERSION, "embedder_id": self.embedder_id, "dim": str(self.dim)}
        if meta.get("index_kind") != self.index_kind:  # written only when it changes: a read-only store still opens
            meta["index_kind"] = self.index_kind
            with self._writing("record the store's settings"):
                self._db.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", meta.items())

    @contextmanager
    def _writing(self, doing: str) -> Iterator[None]:
        """One write transaction, taken before anything is read, so that no other process writes in between; the
        FAISS index is brought up to date first. On failure the database rolls back and the in-memory index, which
        may hold ids the database does not, is resynchronised from the database on its next use."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._follow_other_writers()
                yield
                self._db.execute("COMMIT")
            except BaseException as error:
                if self._db.in_transaction:
                    try:
                        self._db.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass  # SQLite already rolled back (it does after a disk-full error)
                self._data_version = None
                self._ids_by_label_cache = None
                if isinstance(error, (sqlite3.Error, OSError)):
                    where = self.path / DB_FILE if self.path is not None else "in-memory store"
                    raise StoreError(storage_failure(where, error, doing)) from None
                raise

    def _current_data_version(self) -> int:
        return self._db.execute("PRAGMA data_version").fetchone()[0]

    def _follow_other_writers(self) -> None:
        """If another connection committed since we last looked, bring the in-memory index and caches up to date."""
        version = self._current_data_version()
        if self._index is None or version == self._data_version:
            return
        stored_id = self._db.execute("SELECT value FROM meta WHERE key = 'embedder_id'").fetchone()
        if stored_id is not None and stored_id[0] != self.embedder_id:  # another process re-embedded it (`reembed`)
            raise EmbedderMismatchError(_mismatch_message(self.path, stored_id[0], self.dim, self.embedder_id)
                                        + " (another process re-embedded it since it was opened: open it again)")
        self._ids_by_label_cache = None
        stored = self._stored_ids()
        indexed = self._index.ids()
        if not np.array_equal(stored, indexed):
            if not self._index.fits(len(stored), self.dim):
                self._rebuild_index()
            else:
                gone, missing = np.setdiff1d(indexed, stored), np.setdiff1d(stored, indexed)
                if len(gone):
                    self._index.remove(gone)
                if len(missing):
                    self._index.add(missing, self._vectors_of(missing))
                self._index_dirty = True
        self._data_version = version

    def _check_integrity(self) -> None:
        """Refuse a damaged database file (truncated, overwritten) before anything is read from it."""
        if self.path is None:
            return
        damaged = (f"{self.path / DB_FILE}: the example store is damaged ({{}}); it holds every example and cannot "
                   "be rebuilt: restore the workspace from a backup, or start a new workspace and add the examples again")
        try:
            problems = [row[0] for row in self._db.execute("PRAGMA quick_check(3)")]
        except sqlite3.DatabaseError as error:
            if isinstance(error, sqlite3.OperationalError) and "malformed" not in str(error):
                raise StoreError(storage_failure(self.path / DB_FILE, error, "open the example store")) from None
            raise StoreError(damaged.format(error)) from None
        if problems != ["ok"]:
            raise StoreError(damaged.format("; ".join(problems)))

    def _stored_ids(self) -> np.ndarray:
        return np.array([row[0] for row in self._db.execute("SELECT id FROM examples ORDER BY id")], np.int64)

    def _vectors_of(self, ids: np.ndarray) -> np.ndarray:
        rows = dict(self._db.execute(
            "SELECT id, vector FROM examples WHERE id IN (SELECT value FROM json_each(?))", (json.dumps(ids.tolist()),)
        ))
        return np.stack([np.frombuffer(rows[int(i)], dtype=_VECTOR_DTYPE) for i in ids])

    def _known_texts(self, texts: list[str]) -> dict[str, tuple[int, Source]]:
        rows = self._db.execute(
            "SELECT text, id, source FROM examples WHERE text IN (SELECT value FROM json_each(?))", (json.dumps(texts),)
        )
        return {text: (example_id, Source(source)) for text, example_id, source in rows}

    def _replace_labels(self, example_id: int, labels: list[str], source: Source, confidence: float) -> None:
        self._db.execute(
            "UPDATE examples SET labels = ?, source = ?, confidence = ? WHERE id = ?",
            (json.dumps(labels), source.value, confidence, example_id),
        )
        self._db.execute("DELETE FROM example_labels WHERE example_id = ?", (example_id,))
        self._db.executemany(
            "INSERT INTO example_labels (example_id, label) VALUES (?, ?)", [(example_id, label) for label in labels]
        )

    def _ids_by_label(self) -> dict[str, np.ndarray]:
        """Example ids per label; cached because every filtered or balanced search needs it and writes are rarer."""
        if self._ids_by_label_cache is None:
            grouped: dict[str, list[int]] = {}
            for label, example_id in self._db.execute("SELECT label, example_id FROM example_labels ORDER BY label"):
                grouped.setdefault(label, []).append(example_id)
            self._ids_by_label_cache = {label: np.array(ids, dtype=np.int64) for label, ids in grouped.items()}
        return self._ids_by_label_cache

    def _ids_from(self, sources: Iterable[Source | str]) -> np.ndarray:
        values = sorted({_as_source(source).value for source in sources})
        query = f"SELECT id FROM examples WHERE source IN ({', '.join('?' * len(values))})"
        return np.array([row[0] for row in self._db.execute(query, values)], dtype=np.int64)

    def _examples_by_id(self, ids: list[int]) -> dict[int, Example]:
        rows = self._db.execute(
            f"SELECT {_EXAMPLE_COLUMNS} FROM examples WHERE id IN (SELECT value FROM json_each(?))", (json.dumps(ids),)
        )
        return {row[0]: _example(row) for row in rows}

    def _stored_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        rows = self._db.execute("SELECT id, vector FROM examples ORDER BY id").fetchall()
        ids = np.array([row[0] for row in rows], dtype=np.int64)
        vectors = np.empty((len(rows), self.dim), dtype=np.float32)
        for position, row in enumerate(rows):
            vectors[position] = np.frombuffer(row[1], dtype=_VECTOR_DTYPE)
        return ids, vectors

    # The vector index -----------------------------------------------------------------------------------------

    def _load_or_rebuild_index(self) -> tuple[VectorIndex, bool]:
        """The saved index if it is the file last saved (sha256) and holds exactly the stored ids, else a fresh
        one built from SQLite."""
        stored_ids = self._stored_ids()
        index_file = None if self.path is None else self.path / INDEX_FILE
        if index_file is not None and index_file.is_file():
            content = index_file.read_bytes()
            recorded = self._db.execute("SELECT value FROM meta WHERE key = 'index_sha256'").fetchone()
            try:
                if recorded is not None and recorded[0] != _sha256(content):
                    raise RuntimeError("its sha256 differs from the one recorded when it was saved")
                index = VectorIndex.from_bytes(content, kind=self.index_kind)
            except RuntimeError as error:
                log.warning("%s is damaged (%s); rebuilding it from %s", index_file, error, DB_FILE)
            else:
                if not index.fits(len(stored_ids), self.dim):
                    log.info("rebuilding %s as a %s index", index_file,
                             vector_index.structure_for(self.index_kind, len(stored_ids)))
                elif not np.array_equal(index.ids(), stored_ids):
                    log.warning(
                        "%s is out of date (%d vectors for %d examples, or other ids); rebuilding it from %s",
                        index_file, index.faiss.ntotal, len(stored_ids), DB_FILE,
                    )
                else:
                    return index, False
        return self._build_index(*self._stored_vectors()), True

    def _rebuild_index(self) -> None:
        self._index = self._build_index(*self._stored_vectors())
        self._index_dirty = True

    def _build_index(self, ids: np.ndarray, vectors: np.ndarray) -> VectorIndex:
        return VectorIndex.build(ids, vectors, dim=self.dim, kind=self.index_kind)

    def _index_new(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if self._index.fits(len(self), self.dim):
            self._index.add(ids, vectors)
            self._index_dirty = True
        else:
            self._rebuild_index()

    def _neighbors(self, hits: list[list[tuple[int, float]]]) -> list[list[Neighbor]]:
        examples = self._examples_by_id(sorted({i for row in hits for i, _ in row}))
        return [[Neighbor(example=examples[i], score=score) for i, score in row] for row in hits]


# --------------------------------------------------------------------------------------------------- helpers


def _mismatch_message(
    path: Path | None, stored_id: str | None, stored_dim: int, wanted_id: str, wanted_dim: int | None = None
) -> str:
    asked = f"{wanted_id!r}" if wanted_dim is None else f"{wanted_id!r} (dim {wanted_dim})"
    return (
        f"the example store in {path} holds vectors from embedder {stored_id!r} (dim {stored_dim}), but embedder "
        f"{asked} was given; use the embedder the store was built with, or build a new store and re-embed its "
        "texts with the new embedder"
    )


def storage_failure(path: Path | str, error: BaseException, doing: str) -> str:
    """A one-line message for a write that failed: which file, what happened, and what to do about it."""
    reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    code = getattr(error, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or "full" in reason or "No space" in reason:
        hint = "free some disk space, then run the command again"
    elif code in (errno.EROFS, errno.EACCES, errno.EPERM) or "readonly" in reason or "read-only" in reason.lower():
        hint = "the workspace is read-only here: make it writable, or work on a writable copy"
    else:
        hint = "check the disk and the folder's permissions, then run the command again"
    return f"{path}: cannot {doing}: {reason}; {hint}; what was saved before is intact"


def _sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def _as_source(source: Source | str) -> Source:
    try:
        return Source(source)
    except ValueError:
        raise ValueError(f"source must be one of {', '.join(s.value for s in Source)}, not {source!r}") from None


def _unit_rows(vectors: np.ndarray, dim: int, what: str) -> np.ndarray:
    """`vectors` as a C-contiguous float32 (n, dim) array of unit rows; ValueError names the first bad row."""
    try:
        array = np.asarray(vectors, dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{what} vectors must be a numeric array of shape (n, {dim}): {error}") from None
    if array.ndim != 2 or array.shape[1] != dim:
        raise ValueError(f"{what} vectors must have shape (n, {dim}), not {array.shape}")
    finite = np.isfinite(array).all(axis=1)
    if not finite.all():
        raise ValueError(f"row {int(np.argmin(finite))}: {what} vector has a NaN or infinite value")
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"row {int(np.argmin(norms[:, 0]))}: {what} vector is all zeros, so it has no direction")
    return np.ascontiguousarray(array / norms, dtype=_VECTOR_DTYPE)


def _validated_rows(
    texts: Sequence[str],
    labels: Sequence[Sequence[str]] | Sequence[str],
    vectors: np.ndarray,
    confidence: float | Sequence[float],
    dim: int,
) -> list[tuple[str, list[str], np.ndarray, float]]:
    """(text, labels, unit vector, confidence) per row, or ValueError naming the row and field at fault."""
    if isinstance(texts, str) or isinstance(labels, str):
        raise TypeError("texts and labels must be sequences with one entry per text; wrap a single text in a list")
    if len(texts) != len(labels) or len(texts) != len(vectors):
        raise ValueError(f"got {len(texts)} texts, {len(labels)} labels and {len(vectors)} vectors; they must match")
    confidences = [confidence] * len(texts) if np.ndim(confidence) == 0 else list(confidence)
    if len(confidences) != len(texts):
        raise ValueError(f"got {len(confidences)} confidences for {len(texts)} texts")
    unit = _unit_rows(vectors, dim, "example") if len(texts) else np.zeros((0, dim), _VECTOR_DTYPE)
    rows = []
    for row, (text, row_labels, row_confidence) in enumerate(zip(texts, labels, confidences)):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"row {row}: text must be a non-empty string, not {text!r}")
        if isinstance(row_labels, str):
            row_labels = [row_labels]
        elif isinstance(row_labels, Iterable):
            row_labels = list(row_labels)
        else:
            raise ValueError(f"row {row}: labels must be a string or a list of strings, not {row_labels!r}")
        if not row_labels:
            raise ValueError(f"row {row}: labels is empty; every example needs at least one label")
        for label in row_labels:
            if not isinstance(label, str) or not label.strip():
                raise ValueError(f"row {row}: labels must be non-empty strings, not {label!r}")
        if not isinstance(row_confidence, numbers.Real) or not 0.0 <= row_confidence <= 1.0:
            raise ValueError(f"row {row}: confidence must be a number between 0 and 1, not {row_confidence!r}")
        rows.append((text, list(dict.fromkeys(row_labels)), unit[row], float(row_confidence)))
    return rows


def _example(row: tuple) -> Example:
    example_id, text, labels, source, confidence, created_at = row
    return Example(
        id=example_id,
        text=text,
        labels=tuple(json.loads(labels)),
        source=Source(source),
        confidence=confidence,
        created_at=created_at,
    )
