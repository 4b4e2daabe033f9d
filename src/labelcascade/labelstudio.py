"""Label Studio's JSON, so people can check in Label Studio what a job labelled and send their corrections back.

A job's output or review file whose name ends in `.json` is written as Label Studio tasks: each row's columns
(the cascade's answer columns included, so the Data Manager can sort and filter by route and confidence) under
`data`, and the cascade's answer as a pre-annotation under `predictions`, which Label Studio shows ready to accept or
correct (an abstained row gets an empty one). The labelling interface those predictions point at is written beside
the file (`<name>.label_config.xml`): create the project with it, then import the file.

Read back (tables.py reads any `.json` file as Label Studio tasks), a project's export gives its people's labels, and
the loop closes with `labelcascade add WS export.json --review`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from xml.sax.saxutils import quoteattr

from labelcascade.task import split_labels

CHOICES = "label"  # the <Choices> control the predictions fill in
TEXT = "text"  # the <Text> object it labels


def label_config(label_names: Sequence[str], *, text_column: str, multi_label: bool) -> str:
    """The labelling interface (Label Studio's XML) for a task's labels, showing the row's `text_column`."""
    choices = "\n".join(f"    <Choice value={quoteattr(name)}/>" for name in label_names)
    return (f"<View>\n  <Text name={quoteattr(TEXT)} value={quoteattr('$' + text_column)}/>\n"
            f"  <Choices name={quoteattr(CHOICES)} toName={quoteattr(TEXT)} "
            f"choice={quoteattr('multiple' if multi_label else 'single')} showInLine=\"true\">\n"
            f"{choices}\n  </Choices>\n</View>\n")


def config_path(path: Path) -> Path:
    """Where the labelling interface of the tasks in `path` is written."""
    return path.with_name(path.stem + ".label_config.xml")


def write_tasks(path: Path, records: Iterator[dict], *, prefix: str, model_version: str) -> None:
    """Write `records` (a job's rows: input columns plus `<prefix>label`, `confidence`, `route`) as a JSON list of
    Label Studio tasks, one task per line for diffs and streaming."""
    with path.open("w", encoding="utf-8") as file:
        file.write("[")
        for count, record in enumerate(records):
            labels = split_labels(record.get(prefix + "label"))
            prediction = {
                "model_version": f"{model_version} ({record.get(prefix + 'route')})",
                "score": record.get(prefix + "confidence"),
                "result": [{"from_name": CHOICES, "to_name": TEXT, "type": "choices",
                            "value": {"choices": labels}}] if labels else [],
            }
            file.write(("," if count else "") + "\n" + json.dumps({"data": record, "predictions": [prediction]},
                                                                  ensure_ascii=False))
        file.write("\n]\n")
