"""Auto-labelling jobs: label every row of a CSV / JSONL / Parquet file exactly once, in order, resumably.

A job keeps its state in SQLite beside the output (`<output>.state.sqlite`): one row per input row, keyed by the
row's position, holding the finished output record. Rows are classified in batches and each batch is committed in
one transaction, so a job killed at any moment loses at most the batch in flight, and a rerun of the same command
skips what is done. Only when every row is done is the output written, in input order, to a temporary file that is
then renamed into place: the output is either absent or complete, never half written or duplicated.

A full disk or a read-only folder stops the job with one line naming the file (the state or the output); the batches
already committed are kept, so the same command resumes once there is room. A damaged state file is refused, with
the advice to delete it and start over, rather than trusted.

The state remembers which input it belongs to (path, size, modification time, text column); rerunning with another
input and the same state is refused rather than mixed.

Cost control: the LLM's answers are looked up in the workspace's answer cache first (answer_cache.py), so labelling
the same texts again asks the LLM nothing; `max_llm_calls` caps the texts sent to the LLM over the whole job (resumed
runs included: the state counts them), after which the fallback answers alone; `plan` estimates the LLM calls and
the time from a sample before anything runs. The rows a person should look at (abstained, degraded, or answered
with low confidence) can be written to a review file beside the output. "Low" is by default less than halfway from a
guess to certainty (`review_threshold`): a fixed 0.5 would never pick a row of a two-label task, whose answer is
always at least 0.5 sure.
"""

from __future__ import annotations

import csv
import fcntl
import json
import os
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TextIO

import numpy as np

from labelcascade import __version__, labelstudio
from labelcascade.agent import LLMProgress
from labelcascade.answer_cache import AnswerCache
from labelcascade.atomic_file import replace_atomically
from labelcascade.records import Prediction, Route
from labelcascade.retrieval.store import storage_failure
from labelcascade.session import Session
from labelcascade.tables import InputError, Row, file_format, read_rows
from labelcascade.task import LABEL_SEPARATOR, Task, split_labels

STATE_SUFFIX = ".state.sqlite"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rows (
    position INTEGER PRIMARY KEY, route TEXT NOT NULL, cached INTEGER NOT NULL, confidence REAL NOT NULL,
    record TEXT NOT NULL
);
"""
REVIEW_ROUTES = ("abstain", "degraded")
LLM_CALLS = "llm_calls"  # meta key: texts the LLM answered in this job, for its budget


def _same_file(one: Path, other: Path) -> bool:
    """Whether two paths name one file (through links too); a path not there yet is no other file."""
    try:
        return one.resolve() == other.resolve() or (one.exists() and other.exists() and one.samefile(other))
    except OSError:
        return False


def review_threshold(task: Task) -> float:
    """The confidence under which a job's answer goes to review by default: halfway between a guess and certainty,
    (1 + 1/k) / 2 for k labels (0.75 for two, 0.55 for ten), and 0.75 for a multi-label task, whose confidence is a
    chosen label's own yes/no probability."""
    return 0.75 if task.multi_label else (1 + 1 / len(task.labels)) / 2


@dataclass
class JobSummary:
    rows: int
    done_before: int  # rows already labelled by an earlier, interrupted run
    routes: dict[str, int]
    llm_calls: int  # texts the LLM answered for this job (earlier runs included), not counting cached answers
    cached: int  # LLM answers taken from the answer cache
    output: Path
    review: Path | None = None
    review_rows: int = 0
    review_below: float | None = None  # the confidence under which a row went to review


@dataclass
class JobPlan:
    """What a job is expected to cost, measured on a sample of its rows."""

    rows: int  # rows still to label
    sampled: int
    llm_share: float  # share of the sampled rows the cascade would send to the LLM (cached answers excluded)
    llm_calls: int  # expected LLM calls, within the budget
    fallback_s_per_row: float
    llm_s_per_call: float | None  # None when no sampled row needed the LLM
    estimated_s: float

    def describe(self) -> str:
        llm = "-" if self.llm_s_per_call is None else f"{self.llm_s_per_call:.2f} s"
        return (f"{self.rows} rows to label; from a sample of {self.sampled}: {self.llm_share:.1%} need the LLM -> "
                f"about {self.llm_calls} LLM calls; {1000 * self.fallback_s_per_row:.1f} ms per row, {llm} per LLM "
                f"call; estimated {self.estimated_s / 60:.1f} min")


class LabelJob:
    """Labels the rows of `source` with `session` into `destination` (format by its suffix)."""

    def __init__(
        self,
        session: Session,
        source: str | Path,
        destination: str | Path,
        *,
        text_column: str = "text",
        batch_size: int = 64,
        top: int = 3,
        prefix: str = "",
        max_llm_calls: int | None = None,
        cache: bool = True,
        review: str | Path | None = None,
        review_below: float | None = None,
        overwrite: bool = False,
    ):
        """The output has the input's columns plus `label`, `confidence`, `route` and `top` (the `top` most probable
        labels, most probable first, as a list of {"label", "probability"} records: a real list in JSONL and
        Parquet, its JSON text in CSV), each name preceded by `prefix` (needed when the input has such a column).

        `max_llm_calls`: at most this many texts answered by the LLM over the whole job; `cache`: reuse and keep
        the LLM's answers in the workspace's answer cache; `review`: a file (CSV, JSONL or Parquet) for the rows
        that abstained, degraded or whose confidence is under `review_below` (None: `review_threshold` of the task),
        with their 1-based `row` number. A file already at the output's or the review's path is refused unless
        `overwrite`, or unless this job's state is beside it (a rerun writes its own output again); the input
        never.
        An output or review file named `*.json` is a list of Label Studio tasks, the answer as a pre-annotation,
        with its labelling interface beside it (labelstudio.py).
        """
        if max_llm_calls is not None and max_llm_calls < 0:
            raise ValueError(f"max_llm_calls must be 0 or more, got {max_llm_calls}")
        self.session = session
        self.source, self.destination = Path(source), Path(destination)
        self.text_column = text_column
        self.batch_size = batch_size
        self.top = top
        self.prefix = prefix
        self.max_llm_calls = max_llm_calls
        self.review = None if review is None else Path(review)
        self.review_below = review_threshold(session.task) if review_below is None else review_below
        self.overwrite = overwrite
        for path in (self.source, self.destination, self.review):
            if path is not None:
                file_format(path)  # refuses an unknown suffix before any work
        self.state_path = self.destination.with_name(self.destination.name + STATE_SUFFIX)
        self.use_cache = cache
        self.cache: AnswerCache | None = None

    def run(self, *, progress: bool = True) -> JobSummary:
        """Label what is not done yet, then write the output (and the review file); safe to rerun after a kill."""
        try:
            return self._run(progress)
        except sqlite3.DatabaseError as error:
            if isinstance(error, sqlite3.OperationalError):
                raise InputError(storage_failure(self.state_path, error, "record the job's progress")
                                 + "; rerun the same command to resume") from None
            raise InputError(f"{self.state_path}: the job's state is damaged ({error}); delete it to start the job "
                             "over") from None

    @contextmanager
    def _only_job(self) -> Iterator[None]:
        """Hold the job's lock (an flock on `<state>.lock`) for the whole run: a second job writing the same output
        is refused at once, and never touches the first one's state."""
        lock_path = self.state_path.with_name(self.state_path.name + ".lock")
        try:
            handle = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise InputError(storage_failure(lock_path, error, "lock the job's state")) from None
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise InputError(
                    f"{self.destination}: another labelling job is writing this output now (it holds "
                    f"{lock_path.name}); wait for it to finish, or write to another file. Its progress is kept."
                ) from None
            yield
        finally:
            os.close(handle)  # closing releases the lock

    def _check_destinations(self) -> None:
        """Never write over the input; and over another file only when told to (`overwrite`) or when this job's
        state is there, which says the file is this job's own output from an earlier run."""
        outputs = [path for path in (self.destination, self.review) if path is not None]
        for path in outputs:
            if _same_file(path, self.source):
                raise InputError(f"{path}: this is the input file; write the answers to another file")
        if len(outputs) == 2 and _same_file(*outputs):
            raise InputError(f"{self.review}: the review file would replace the output; give it another name")
        if self.overwrite or self.state_path.exists():
            return
        for path in outputs:
            if path.exists():
                raise InputError(f"{path} exists and is not the output of this job (no {self.state_path.name} beside "
                                 "it); write to another file, delete it, or replace it with --overwrite")

    def _run(self, progress: bool) -> JobSummary:
        with self._only_job():
            self._check_destinations()
            return self._labelled(progress)

    def _labelled(self, progress: bool) -> JobSummary:
        with self._answer_cache(), sqlite3.connect(self.state_path) as state:
            state.executescript(_SCHEMA)
            self._check_input(state)
            done = {position for (position,) in state.execute("SELECT position FROM rows")}
            routes = Counter(dict(state.execute("SELECT route, COUNT(*) FROM rows GROUP BY route")))
            llm_calls, cached = self._llm_counts(state)
            total = self._count_rows()
            bar = JobBar(total, len(done), self.max_llm_calls) if progress else None
            for batch, predictions, from_cache, asked in self._answered(done, llm_calls, bar):
                records = [
                    (position, p.route.value, int(hit), p.confidence, json.dumps(self._record(row, p), ensure_ascii=False))
                    for (position, row), p, hit in zip(batch, predictions, from_cache, strict=True)
                ]
                llm_calls += asked
                with state:  # one transaction per batch: all of it is done, or none of it
                    state.executemany("INSERT INTO rows VALUES (?, ?, ?, ?, ?)", records)
                    state.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (LLM_CALLS, str(llm_calls)))
                routes.update(p.route.value for p in predictions)
                cached += sum(from_cache)
                if bar is not None:
                    bar.committed(sum(routes.values()), predictions, from_cache, routes, llm_calls, cached)
            if bar is not None:
                bar.close()
            self._write_output(state, total)
            review_rows = self._write_review(state)
        return JobSummary(rows=total, done_before=len(done), routes=dict(routes), llm_calls=llm_calls, cached=cached,
                          output=self.destination, review=self.review, review_rows=review_rows,
                          review_below=self.review_below if self.review else None)

    def _answered(self, done: set[int], llm_calls: int,
                  bar: JobBar | None) -> Iterator[tuple[list[tuple[int, Row]], list[Prediction], list[bool], int]]:
        """The rows not done yet, a batch at a time, with their answers, which came from the cache, and how many
        texts the LLM answered for them (`llm_calls`: how many it answered for the job before). What is yielded is
        committed before the next batch is asked for. A Ray job answers them on a cluster instead (ray_jobs.py)."""
        for batch in self._pending_batches(done):
            predictions, from_cache, asked = self._answer([row.text for _, row in batch], llm_calls, bar)
            llm_calls += asked
            yield batch, predictions, from_cache, asked

    def _answer(self, texts: list[str], llm_calls: int,
                bar: JobBar | None = None) -> tuple[list[Prediction], list[bool], int]:
        """Answers for one batch: cached LLM answers first, the session for the rest within the budget; and how
        many texts the LLM answered (those that then abstained included: the call was made). The LLM's answers go
        into the answer cache as they arrive, so a job killed in the middle of a batch asks the LLM again only for
        what it had not answered yet."""
        # The version before classifying: the answers are made with this fallback and policy, even when learning
        # from them retrains the fallback at the end of the batch; and with what another process saved to the
        # workspace during the job (`add`, `calibrate`, `add-label` beside it), read again now.
        self.session.refresh()
        version = self.session.answer_version() if self.cache is not None else ""
        hits = self.cache.get(texts, version) if self.cache is not None else {}
        misses = [i for i in range(len(texts)) if i not in hits]
        left = None if self.max_llm_calls is None else max(0, self.max_llm_calls - llm_calls)

        asked = 0

        def arrived(step: LLMProgress) -> None:
            nonlocal asked
            asked += sum(p.route is not Route.DEGRADED for p in step.predictions)
            if self.cache is not None and step.predictions:
                self.cache.put([texts[misses[i]] for i in step.indices], step.predictions, version)
            if bar is not None:
                if step.indices:
                    bar.advance(len(step.indices), step.predictions, llm_calls + asked)
                else:
                    bar.advance(len(texts) - step.total)

        fresh = self.session.classify([texts[i] for i in misses], llm_limit=left, on_llm=arrived) if misses else []
        answers = {**hits, **dict(zip(misses, fresh, strict=True))}
        return [answers[i] for i in range(len(texts))], [i in hits for i in range(len(texts))], asked

    def plan(self, *, sample: int = 200, llm_sample: int = 8) -> JobPlan:
        """Estimate the job's LLM calls and time from `sample` rows spread over the input; nothing is stored or
        learned. `llm_sample` of the rows that need the LLM are sent to it to time a call."""
        with self._answer_cache():
            return self._plan(sample, llm_sample)

    @contextmanager
    def _answer_cache(self):
        self.cache = self.session.answer_cache() if self.use_cache else None
        try:
            yield
        finally:
            if self.cache is not None:
                self.cache.close()
            self.cache = None

    def _plan(self, sample: int, llm_sample: int) -> JobPlan:
        done = 0
        if self.state_path.exists():
            with sqlite3.connect(self.state_path) as state:
                done = state.execute("SELECT COUNT(*) FROM rows").fetchone()[0]
                llm_calls = self._llm_counts(state)[0]
        else:
            llm_calls = 0
        total = self._count_rows()
        step = max(1, total // sample)
        texts = [row.text for i, row in enumerate(read_rows(self.source, text_column=self.text_column))
                 if i % step == 0][:sample]
        hits = self.cache.get(texts, self.session.answer_version()) if self.cache is not None else {}
        began = time.perf_counter()  # embedding + fallback: what every row costs
        unsure = self.session.unsure(texts)
        fallback_s = (time.perf_counter() - began) / len(texts)
        need = unsure & ~np.isin(np.arange(len(texts)), list(hits))
        llm_s = None
        asked = [texts[i] for i in np.flatnonzero(need)[: llm_sample + 1]]
        if len(asked) >= 2:
            self.session.classify(asked[:1], learn=False)  # loads the engine: not a cost per call
            began = time.perf_counter()
            self.session.classify(asked[1:], learn=False)
            llm_s = max(0.0, (time.perf_counter() - began) / len(asked[1:]) - fallback_s)
        pending = total - done
        calls = round(float(need.mean()) * pending)
        if self.max_llm_calls is not None:
            calls = min(calls, max(0, self.max_llm_calls - llm_calls))
        return JobPlan(rows=pending, sampled=len(texts), llm_share=float(need.mean()), llm_calls=calls,
                       fallback_s_per_row=fallback_s, llm_s_per_call=llm_s,
                       estimated_s=pending * fallback_s + calls * (llm_s or 0.0))

    @staticmethod
    def _llm_counts(state: sqlite3.Connection) -> tuple[int, int]:
        """(texts the LLM answered, answers from the cache) among the rows done. The first is kept in the state's
        meta table (a text the LLM answered may then abstain); a state written before it was counts LLM routes."""
        fresh, cached = state.execute(
            "SELECT COALESCE(SUM(route = 'llm' AND cached = 0), 0), COALESCE(SUM(cached), 0) FROM rows"
        ).fetchone()
        kept = state.execute("SELECT value FROM meta WHERE key = ?", (LLM_CALLS,)).fetchone()
        return int(kept[0]) if kept else int(fresh), int(cached)

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
        answer = answer_columns(prediction, multi_label=self.session.task.multi_label, top=self.top, prefix=self.prefix)
        clash = sorted(set(answer) & set(row.columns))
        if clash:
            raise InputError(f"{self.source}: line {row.line}: the input already has the columns {clash}; "
                             "choose a prefix for the answer's columns (--prefix pred_)")
        return {**row.columns, **answer}

    def _check_input(self, state: sqlite3.Connection) -> None:
        stat = self.source.stat()
        identity = {"input": str(self.source.resolve()), "size": str(stat.st_size), "mtime_ns": str(stat.st_mtime_ns),
                    "text_column": self.text_column}
        stored = {key: value for key, value in state.execute("SELECT key, value FROM meta") if key != LLM_CALLS}
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
        self._write(self.destination, records)

    def _write_review(self, state: sqlite3.Connection) -> int:
        if self.review is None:
            return 0
        query = (f"SELECT position, record FROM rows WHERE route IN {REVIEW_ROUTES} OR confidence < ? "
                 "ORDER BY position")
        rows = state.execute(query, (self.review_below,)).fetchall()
        self._write(self.review, ({"row": position + 1, **json.loads(record)} for position, record in rows))
        return len(rows)

    def _write(self, path: Path, records: Iterator[dict]) -> None:
        """Write `path` in the format its suffix names; Label Studio tasks get their labelling interface beside.
        A multi-label answer is kept joined by "|" (in the state, and in CSV, as `add` and `init --data` read a CSV
        cell); JSONL and Parquet get it as a list of labels, as they get `top`."""
        if file_format(path) in ("jsonl", "parquet") and self.session.task.multi_label:
            column = self.prefix + "label"
            records = ({**record, column: split_labels(record[column])} for record in records)
        if file_format(path) != "label-studio":
            _write_atomically(path, partial(_WRITERS[file_format(path)], records=records))
            return
        task = self.session.task
        config = labelstudio.label_config(task.label_names, text_column=self.text_column, multi_label=task.multi_label)
        _write_atomically(labelstudio.config_path(path), lambda temporary: temporary.write_text(config, "utf-8"))
        _write_atomically(path, partial(labelstudio.write_tasks, records=records, prefix=self.prefix,
                                        model_version=f"labelcascade {__version__}"))


def answer_columns(prediction: Prediction, *, multi_label: bool, top: int, prefix: str = "",
                   joined: bool = True) -> dict:
    """The columns a job adds to a row: `label` (multi-label: the labels joined by "|", or their list if not
    `joined`), `confidence`, `route` and `top` (the `top` most probable labels as {"label", "probability"} records),
    each name after `prefix`."""
    if multi_label:
        label = LABEL_SEPARATOR.join(prediction.labels) if joined else list(prediction.labels)
    else:
        label = prediction.label
    return {
        prefix + "label": label,
        prefix + "confidence": round(prediction.confidence, 4),
        prefix + "route": prediction.route.value,
        prefix + "top": prediction.summary(top)["top"],
    }


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """`path` is absent, the old file, or complete: never half an output."""
    try:
        replace_atomically(path, write)
    except OSError as error:
        raise InputError(storage_failure(path, error, "write the output") + "; rerun the same command to write it "
                         "(every row is labelled already)") from None


def _write_jsonl(path: Path, records: Iterator[dict]) -> None:
    with path.open("w", encoding="utf-8") as file:
        for record in records:
            file.write(json.dumps(record, ensure_ascii=False) + "\n")


def _write_csv(path: Path, records: Iterator[dict]) -> None:
    """A CSV cell holds text: lists and objects (`top`, or an input's own) are written as JSON, which tools read
    back, rather than as Python's repr."""
    with path.open("w", encoding="utf-8", newline="") as file:
        writer = None
        for record in records:
            if writer is None:
                writer = csv.DictWriter(file, fieldnames=list(record))
                writer.writeheader()
            writer.writerow({key: json.dumps(value, ensure_ascii=False) if isinstance(value, list | dict) else value
                             for key, value in record.items()})


def _write_parquet(path: Path, records: Iterator[dict]) -> None:
    """Column types come from the values; a column of nulls only (`label` when every row abstained) is written as
    text rather than Arrow's null type, so pandas, `datasets` and a concatenation with another job's file agree."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(list(records))
    schema = pa.schema([field.with_type(pa.string()) if pa.types.is_null(field.type) else field for field in table.schema])
    pq.write_table(table.cast(schema), path)


_WRITERS = {"jsonl": _write_jsonl, "csv": _write_csv, "parquet": _write_parquet}


class JobBar:
    """The job's progress bar on stderr: rows done, advancing within a batch as the LLM answers (a first batch of
    LLM-bound rows used to sit at 0 for minutes), answers per route, LLM calls and the budget left, the LLM's rate,
    and a time left that knows the budget: once `max_llm_calls` is spent the remaining rows go at the fallback's
    speed, which tqdm's own estimate (the mean rate so far) cannot know."""

    FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}, {rate_fmt}{postfix}]"
    LOG_SECONDS = 30  # off a terminal: one line of progress at most this often

    def __init__(self, total: int, done: int, max_llm_calls: int | None, *, stream: TextIO | None = None) -> None:
        """On a terminal the bar is redrawn in place; on anything else (a log file, a pipe, a service manager's
        journal) each state is a line of its own, at most every `LOG_SECONDS`: redrawn in place there, the whole
        job was one line of thousands of frames joined by carriage returns."""
        from tqdm import tqdm

        stream = sys.stderr if stream is None else stream
        self.terminal = stream.isatty()
        options = {"dynamic_ncols": True} if self.terminal else {"file": _Lines(stream), "ncols": 100,
                                                                  "mininterval": self.LOG_SECONDS, "ascii": True}
        self.bar = tqdm(total=total, initial=done, unit="row", desc="labelling", bar_format=self.FORMAT, **options)
        self.max_llm_calls = max_llm_calls
        self.started = time.monotonic()
        self.seconds = {"fallback": 0.0, "llm": 0.0}  # answer latencies of this run's fresh answers, by kind
        self.answered = {"fallback": 0, "llm": 0}
        self._routes: Counter = Counter()  # answers per route, of the committed batches
        self._running: list[Prediction] = []  # the running batch's LLM answers shown by `advance`, until its commit
        self._cached = 0

    def advance(self, rows: int, llm_answers: Sequence[Prediction] = (), llm_calls: int = 0) -> None:
        """`rows` of the running batch answered. The LLM's answers among them (`llm_answers`; `llm_calls`: the job's
        LLM calls with them) count toward the routes, the calls, the budget, the LLM's rate and the time left now,
        not at the batch's commit: a first batch of LLM-bound rows showed none of these for as long as it took."""
        self.bar.update(rows)
        if not llm_answers:
            return
        for p in llm_answers:
            self._timed(p)
            self._running.append(p)
        self._show(self._routes + Counter(p.route.value for p in self._running), llm_calls)

    def committed(self, rows_done: int, predictions, from_cache, routes: Counter, llm_calls: int, cached: int) -> None:
        self.bar.update(rows_done - self.bar.n)
        for p, hit in zip(predictions, from_cache, strict=True):
            if hit:
                continue
            if p in self._running:  # timed by `advance` (an equal copy: the cascade makes its answers twice)
                self._running.remove(p)
            else:
                self._timed(p)
        self._routes, self._running, self._cached = Counter(routes), [], cached
        self._show(self._routes, llm_calls)

    def _timed(self, prediction: Prediction) -> None:
        kind = "llm" if prediction.route is Route.LLM else "fallback"
        self.seconds[kind] += prediction.latency_ms / 1000
        self.answered[kind] += 1

    def _show(self, routes: Counter, llm_calls: int) -> None:
        budget = {} if self.max_llm_calls is None else {"budget left": max(0, self.max_llm_calls - llm_calls)}
        llm_rate = self.answered["llm"] / max(self.seconds["llm"], 1e-9) if self.answered["llm"] else None
        self.bar.set_postfix({**routes, "llm calls": llm_calls, **budget, "cached": self._cached,
                              **({"llm/s": f"{llm_rate:.2f}"} if llm_rate else {}),
                              "left": self._time_left(llm_calls)}, refresh=self.terminal)

    def _time_left(self, llm_calls: int) -> str:
        rows_left = self.bar.total - self.bar.n
        fresh = self.answered["fallback"] + self.answered["llm"]
        if not fresh or not rows_left:
            return "?" if rows_left else "0s"
        per_fallback = self.seconds["fallback"] / max(self.answered["fallback"], 1)
        per_llm = self.seconds["llm"] / self.answered["llm"] if self.answered["llm"] else per_fallback
        llm_rows = rows_left * self.answered["llm"] / fresh
        if self.max_llm_calls is not None:
            llm_rows = min(llm_rows, max(0, self.max_llm_calls - llm_calls))
        # answer latencies leave out batching, learning and commits: scale by what the run's wall time says
        overhead = (time.monotonic() - self.started) / max(sum(self.seconds.values()), 1e-9)
        seconds = (rows_left * per_fallback + llm_rows * (per_llm - per_fallback)) * max(overhead, 1.0)
        return self.bar.format_interval(seconds)

    def close(self) -> None:
        self.bar.close()


class _Lines:
    """A stream for tqdm off a terminal: each frame it draws (a carriage return, the bar, spaces that would wipe a
    longer one) written as one line."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()
