"""Auto-labelling jobs: label every row of a CSV / JSONL / Parquet file exactly once, in order, resumably.

A job keeps its state in SQLite beside the output (`<output>.state.sqlite`): one row per input row, keyed by the
row's position, holding the finished output record. Rows are classified in batches and each batch is committed in
one transaction, so a job killed at any moment loses at most the batch in flight, and a rerun of the same command
skips what is done. Only when every row is done is the output written, in input order, to a temporary file that is
then renamed into place: the output is either absent or complete, never half written or duplicated.

The state remembers which input it belongs to (path, size, modification time, text column); rerunning with another
input and the same state is refused rather than mixed.
"""

from __future__ import annotations

import csv
import json
import os
import sqlite3
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from labelcascade.classifier import Classifier
from labelcascade.records import Prediction
from labelcascade.tables import InputError, Row, file_format, read_rows

STATE_SUFFIX = ".state.sqlite"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rows (position INTEGER PRIMARY KEY, route TEXT NOT NULL, record TEXT NOT NULL);
"""


@dataclass
class JobSummary:
    rows: int
    done_before: int  # rows already labelled by an earlier, interrupted run
    routes: dict[str, int]
    output: Path


class LabelJob:
    """Labels the rows of `source` with `classifier` into `destination` (format by its suffix)."""

    def __init__(
        self,
        classifier: Classifier,
        source: str | Path,
        destination: str | Path,
        *,
        text_column: str = "text",
        batch_size: int = 64,
        top: int = 3,
        prefix: str = "",
    ):
        """The output has the input's columns plus `label`, `confidence`, `route` and `top` (a JSON object of the
        `top` most probable labels), each name preceded by `prefix` (needed when the input has such a column)."""
        self.classifier = classifier
        self.source, self.destination = Path(source), Path(destination)
        self.text_column = text_column
        self.batch_size = batch_size
        self.top = top
        self.prefix = prefix
        file_format(self.source)
        self.output_format = file_format(self.destination)
        self.state_path = self.destination.with_name(self.destination.name + STATE_SUFFIX)

    def run(self, *, progress: bool = True) -> JobSummary:
        """Label what is not done yet, then write the output; safe to rerun after a kill."""
        with sqlite3.connect(self.state_path) as state:
            state.executescript(_SCHEMA)
            self._check_input(state)
            done = {position for (position,) in state.execute("SELECT position FROM rows")}
            routes = Counter(route for (route,) in state.execute("SELECT route FROM rows"))
            total = self._count_rows()
            bar = _progress(total, len(done), progress)
            for batch in self._pending_batches(done):
                predictions = self.classifier.classify([row.text for _, row in batch])
                records = [(position, p.route.value, json.dumps(self._record(row, p), ensure_ascii=False))
                           for (position, row), p in zip(batch, predictions, strict=True)]
                with state:  # one transaction per batch: all of it is done, or none of it
                    state.executemany("INSERT INTO rows (position, route, record) VALUES (?, ?, ?)", records)
                routes.update(route for _, route, _ in records)
                if bar is not None:
                    bar.update(len(batch))
                    bar.set_postfix(routes)
            if bar is not None:
                bar.close()
            self._write_output(state, total)
        return JobSummary(rows=total, done_before=len(done), routes=dict(routes), output=self.destination)

    def _pending_batches(self, done: set[int]) -> Iterator[list[tuple[int, Row]]]:
        batch: list[tuple[int, Row]] = []
        for position, row in enumerate(read_rows(self.source, text_column=self.text_column)):
            if position in done:
                continue
            batch.append((position, row))
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def _count_rows(self) -> int:
        """Rows in the input, checked in full before any work, so a bad row 900,000 stops the job at the start."""
        return sum(1 for _ in read_rows(self.source, text_column=self.text_column))

    def _record(self, row: Row, prediction: Prediction) -> dict:
        best = sorted(prediction.probabilities.items(), key=lambda item: -item[1])[: self.top]
        answer = {
            self.prefix + "label": prediction.label if not self.classifier.task.multi_label else "|".join(prediction.labels),
            self.prefix + "confidence": round(prediction.confidence, 4),
            self.prefix + "route": prediction.route.value,
            self.prefix + "top": json.dumps({label: round(p, 4) for label, p in best}),
        }
        clash = sorted(set(answer) & set(row.columns))
        if clash:
            raise InputError(f"{self.source}: line {row.line}: the input already has the columns {clash}; "
                             "choose a prefix for the answer's columns (--prefix pred_)")
        return {**row.columns, **answer}

    def _check_input(self, state: sqlite3.Connection) -> None:
        stat = self.source.stat()
        identity = {"input": str(self.source.resolve()), "size": str(stat.st_size), "mtime_ns": str(stat.st_mtime_ns),
                    "text_column": self.text_column}
        stored = dict(state.execute("SELECT key, value FROM meta"))
        if stored and stored != identity:
            changed = [key for key in identity if stored.get(key) != identity[key]]
            raise InputError(f"{self.state_path}: this job state belongs to another input ({', '.join(changed)} differ); "
                             "delete the state file to start over, or write to another output")
        with state:
            state.executemany("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)", identity.items())

    def _write_output(self, state: sqlite3.Connection, total: int) -> None:
        count = state.execute("SELECT COUNT(*) FROM rows").fetchone()[0]
        if count != total:
            raise RuntimeError(f"{self.state_path}: {count} rows labelled but the input has {total}")
        records = (json.loads(record) for (record,) in state.execute("SELECT record FROM rows ORDER BY position"))
        temporary = self.destination.with_name(self.destination.name + ".tmp")
        _WRITERS[self.output_format](temporary, records)
        with temporary.open("rb") as file:
            os.fsync(file.fileno())
        os.replace(temporary, self.destination)


def _write_jsonl(path: Path, records: Iterator[dict]) -> None:
    with path.open("w", encoding="utf-8") as file:
        for record in records:
            file.write(json.dumps(record, ensure_ascii=False) + "\n")


def _write_csv(path: Path, records: Iterator[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="") as file:
        writer = None
        for record in records:
            if writer is None:
                writer = csv.DictWriter(file, fieldnames=list(record))
                writer.writeheader()
            writer.writerow(record)


def _write_parquet(path: Path, records: Iterator[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(list(records)), path)


_WRITERS = {"jsonl": _write_jsonl, "csv": _write_csv, "parquet": _write_parquet}


def _progress(total: int, done: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=done, unit="row", desc="labelling", dynamic_ncols=True)
