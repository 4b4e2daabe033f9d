"""Reading texts (and labels) from the files people have: CSV, JSONL or Parquet.

Every problem is reported with the file, the line (the row, for Parquet) and the field, so a bad row in a file of
a million can be found and fixed; nothing is skipped silently. Multi-label rows carry a list in JSONL and Parquet,
or labels joined by "|" in CSV.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from labelcascade.task import LABEL_SEPARATOR

# .json: a list of Label Studio tasks (labelstudio.py writes them; a project's export is read back)
FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".json": "label-studio"}


class InputError(ValueError):
    """A file that cannot be read as rows of text (and labels); the message names file, line and field."""


@dataclass(frozen=True)
class Row:
    """One input row: where it came from, its text, its labels (empty if unlabelled) and every column as read."""

    line: int
    text: str
    labels: tuple[str, ...]
    columns: dict


def file_format(path: Path) -> str:
    try:
        return FORMATS[path.suffix.lower()]
    except KeyError:
        raise InputError(f"{path}: unknown file type {path.suffix!r}; use one of {', '.join(FORMATS)}") from None


def read_rows(
    path: str | Path,
    *,
    text_column: str = "text",
    label_column: str | None = None,
    known_labels: Sequence[str] | None = None,
    no_label: Collection[str] | None = None,
) -> Iterator[Row]:
    """The rows of a file in order. With `label_column`, every row must have a label (checked against
    `known_labels` if given); without, labels are left empty.

    `no_label`: for files that measure a task which may answer "none of these" (out-of-scope texts), the label
    values that mean a text has no label, besides an empty or missing one (null, "", [] or no field); such rows get
    empty labels instead of an error. None: every row needs a label."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    known = None if known_labels is None else set(known_labels)
    kind = file_format(path)
    records = _label_studio_records(path, label_column) if kind == "label-studio" else _records(path, kind)
    for line, columns in records:
        where = f"{path}: {_PLACES.get(kind, 'line')} {line}"
        text = columns.get(text_column)
        if text_column not in columns:
            raise InputError(f"{where}: no column {text_column!r} (columns: {', '.join(map(str, columns))}); "
                             "name the text column with --text-column")
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{where}: {text_column}: empty or not text")
        labels: tuple[str, ...] = ()
        if label_column is not None and not (no_label is not None and _unlabelled(columns.get(label_column), no_label)):
            labels = _labels(columns.get(label_column), f"{where}: {label_column}")
            unknown = [label for label in labels if known is not None and label not in known]
            if unknown:
                raise InputError(f"{where}: {label_column}: unknown label {unknown[0]!r}; the task's labels are {sorted(known)}")
        yield Row(line, text, labels, columns)


_PLACES = {"parquet": "row", "label-studio": "task"}


def _unlabelled(value, no_label: Collection[str]) -> bool:
    if value is None or (isinstance(value, str) and (not value.strip() or value.strip() in no_label)):
        return True
    return isinstance(value, list | tuple) and len(value) == 0


def _labels(value, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        labels = tuple(part.strip() for part in value.split(LABEL_SEPARATOR))
    elif isinstance(value, list | tuple) or hasattr(value, "tolist"):
        labels = tuple(value.tolist() if hasattr(value, "tolist") else value)
    elif isinstance(value, int | float) and value == value:  # bool too; NaN (a missing value in pandas) is not
        raise InputError(f"{where}: {value!r} is a number; the LLM reads label names, so give names (map your class "
                         "ids to words, e.g. 0 -> negative, 1 -> positive)")
    else:
        raise InputError(f"{where}: missing label")
    if wrong := next((label for label in labels if not isinstance(label, str)), None):
        raise InputError(f"{where}: a label must be a string, not {type(wrong).__name__}; give a label name or a list of them")
    if not labels or any(not label.strip() for label in labels):
        raise InputError(f"{where}: empty label")
    return labels


# A JSONL line longer than this is refused before it is read whole (a single line can be gigabytes); far above any
# text the LLM or the fallback reads (the prompt keeps 2,000 bytes of a text).
MAX_LINE_CHARS = 16 * 1024 * 1024

def _records(path: Path, kind: str) -> Iterator[tuple[int, dict]]:
    """(line number, row as a dict) for each record; CSV and JSONL count lines from 1 as an editor does.

    Text files are read as UTF-8, a leading byte-order mark (as spreadsheet programs write) ignored.
    """
    if kind == "parquet":
        yield from _parquet_records(path)
        return
    ended = 0  # the last line of the last complete CSV record: a malformed one starts after it
    try:
        with path.open(encoding="utf-8-sig", newline="") as file:
            if kind == "csv":
                reader = csv.DictReader(file, strict=True)  # an unclosed quote is an error, not a text to the end
                ended = reader.line_num if reader.fieldnames is not None else 0  # reading the header
                names = reader.fieldnames or []
                if repeated := sorted({name for name in names if names.count(name) > 1}):
                    raise InputError(f"{path}: line 1: column {repeated[0]!r} appears {names.count(repeated[0])} times "
                                     "in the header, and only one could be read; name each column once")
                for record in reader:
                    if None in record:
                        raise InputError(f"{path}: line {reader.line_num}: more fields than the header has")
                    ended = reader.line_num
                    yield reader.line_num, record
                return
            for number, text in enumerate(iter(lambda: file.readline(MAX_LINE_CHARS + 1), ""), 1):
                if len(text) > MAX_LINE_CHARS:
                    raise InputError(f"{path}: line {number}: longer than {MAX_LINE_CHARS:,} characters; a row is one "
                                     "text and its fields, not a whole file")
                if not text.strip():
                    continue
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as error:
                    raise InputError(f"{path}: line {number}: not valid JSON ({error.msg})") from None
                except RecursionError:
                    raise InputError(f"{path}: line {number}: JSON nested too deeply to read; a row is one object "
                                     "of plain fields") from None
                if not isinstance(record, dict):
                    raise InputError(f"{path}: line {number}: expected a JSON object, got {type(record).__name__}")
                yield number, record
    except UnicodeDecodeError:
        raise InputError(f"{path}: {_first_undecodable(path)}: not UTF-8 text; save it as UTF-8") from None
    except csv.Error as error:
        if "field larger than field limit" in str(error):
            raise InputError(f"{path}: line {ended + 1}: a field longer than {csv.field_size_limit():,} characters, "
                             "the most a CSV field may hold here; give long texts as JSONL") from None
        raise InputError(f"{path}: line {ended + 1}: malformed CSV in the record that starts here ({error})") from None


def _first_undecodable(path: Path) -> str:
    """Where the first byte that is not UTF-8 lies, as 'line N, byte M' (the decoder only knows its own buffer)."""
    with path.open("rb") as file:
        for number, line in enumerate(file, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                return f"line {number}, byte {error.start + 1}"
    return "end of file"


def _parquet_records(path: Path) -> Iterator[tuple[int, dict]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as error:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        raise InputError(f"{path}: not a readable Parquet file ({error})") from None
    number = 0
    try:
        for batch in parquet.iter_batches():
            for record in batch.to_pylist():
                number += 1
                yield number, record
    except (OSError, ValueError) as error:  # pyarrow's errors for damaged pages (ArrowInvalid is a ValueError)
        raise InputError(f"{path}: row {number + 1}: damaged Parquet data ({error})") from None


def _label_studio_records(path: Path, label_column: str | None) -> Iterator[tuple[int, dict]]:
    """(task number from 1, the task's `data`) for each task. With `label_column`, that column holds the choices of
    the task's latest annotation that was not skipped, replacing whatever `data` had there (the cascade's own guess,
    when the file was written by a job); an annotation with no choice is an empty list (no label: out of scope), a
    task with no annotation is refused (nobody labelled it)."""
    try:
        with path.open(encoding="utf-8-sig") as file:
            tasks = json.load(file)
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text; save it as UTF-8") from None
    except json.JSONDecodeError as error:
        raise InputError(f"{path}: line {error.lineno}: not valid JSON ({error.msg})") from None
    if isinstance(tasks, dict):  # Label Studio also imports a single task as a bare object
        tasks = [tasks]
    if not isinstance(tasks, list):
        raise InputError(f"{path}: expected a list of Label Studio tasks, got {type(tasks).__name__}")
    for number, task in enumerate(tasks, 1):
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise InputError(f"{path}: task {number}: no 'data' object; a Label Studio task is "
                             '{"data": {"text": ...}}')
        data = dict(task["data"])
        if label_column is not None:
            data[label_column] = _annotated(task, path, number)
        yield number, data


def _annotated(task: dict, path: Path, number: int) -> list[str]:
    annotations = task.get("annotations") or []
    kept = [a for a in annotations if isinstance(a, dict) and not a.get("was_cancelled")]
    if not kept:
        raise InputError(f"{path}: task {number}: not annotated (or skipped) in Label Studio, so it has no label; "
                         "annotate it, or export only annotated tasks")
    _, latest = max(enumerate(kept), key=lambda pair: (str(pair[1].get("updated_at") or pair[1].get("created_at")
                                                            or ""), pair[0]))  # the last one listed breaks a tie
    choices = [choice for result in latest.get("result") or [] if isinstance(result, dict)
               and result.get("type") == "choices" for choice in (result.get("value") or {}).get("choices") or []]
    if not choices and latest.get("result"):
        raise InputError(f"{path}: task {number}: its annotation has no choices; labelcascade reads a <Choices> "
                         "answer (label with the interface written beside the review file)")
    return choices
