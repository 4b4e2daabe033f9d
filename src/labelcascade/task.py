"""The task: what to classify into. Written as YAML or built in Python, refused early when it is wrong.

A task file looks like:

    name: banking-intents
    instructions: Classify the customer's message by what they want.
    multi_label: false        # one label per text (default) or any number
    allow_abstain: false      # may the answer be "none of these"?
    labels:
      - name: card_arrival
        description: The customer asks when their card will arrive.
        examples: ["My card hasn't come yet", "When will the new card get here?"]
      - lost_or_stolen_card   # a bare name is a label with no description or examples
    examples:                 # more seed examples, each naming its label(s)
      - {text: "I lost my card in the park", label: lost_or_stolen_card}

Every error names the file, the line and the field, and says what is wrong.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


LABEL_SEPARATOR = "|"  # joins the labels of a multi-label row in CSV files (tables.py)


def split_labels(joined: str | None) -> list[str]:
    """A multi-label answer joined by LABEL_SEPARATOR (as a job keeps it) as its list of labels; none: []."""
    return joined.split(LABEL_SEPARATOR) if joined else []


class TaskError(ValueError):
    """A task that cannot be used; the message names where and what."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


class Label(_Strict):
    """One class the task can answer."""

    name: str = Field(description="The label as answered; unique within the task.")
    description: str = Field("", description="What the label means, shown to the LLM.")
    examples: tuple[str, ...] = Field((), description="Seed texts that carry this label.")
    verbalizer: str | None = Field(None, description="The words the LLM scores for this label, if not its name.")

    @field_validator("name")
    @classmethod
    def _name_is_one_short_line(cls, name: str) -> str:
        if not name:
            raise ValueError("label name is empty")
        return _one_short_line(name, "label name")

    @field_validator("verbalizer")
    @classmethod
    def _verbalizer_is_one_short_line(cls, verbalizer: str | None) -> str | None:
        if verbalizer is not None and not verbalizer:
            raise ValueError("verbalizer is empty")
        return verbalizer if verbalizer is None else _one_short_line(verbalizer, "verbalizer")

    @field_validator("examples")
    @classmethod
    def _examples_not_empty(cls, examples: tuple[str, ...]) -> tuple[str, ...]:
        for i, text in enumerate(examples):
            if not text.strip():
                raise ValueError(f"example {i} is an empty text")
        return examples


# A label is answered as " <name>\n" and listed on a line of its own in prompts, joined by "|" in CSV files and
# used as a column of reports: so it is one line of printable text, short enough to score cheaply. A label that
# reads like an instruction ("Ignore previous instructions") is allowed: it stays one item of the label list, and
# the answer is still chosen among the task's labels by scoring, never parsed from free text.
MAX_LABEL_CHARS = 100
# A task file is read whole and walked as YAML; bigger than this it is not a task but a dataset in the wrong place.
MAX_TASK_BYTES = 16 * 1024 * 1024


def _one_short_line(value: str, what: str) -> str:
    """`value` if it is at most MAX_LABEL_CHARS printable characters on one line without '|'; else why not."""
    if len(value) > MAX_LABEL_CHARS:
        raise ValueError(f"{what} has {len(value)} characters; at most {MAX_LABEL_CHARS}")
    bad = next((char for char in value if not char.isprintable() and char != " "), None)
    if bad is not None:
        raise ValueError(f"{what} {value!r} contains {bad!r}, which is not printable text; a label is one line of text")
    if LABEL_SEPARATOR in value:
        raise ValueError(f"{what} {value!r} contains {LABEL_SEPARATOR!r}, which separates labels in CSV files")
    return value


class SeedExample(_Strict):
    """A labelled text given with the task."""

    text: str
    label: str | tuple[str, ...] = Field(description="One label, or a list of labels for multi-label tasks.")

    @field_validator("text")
    @classmethod
    def _text_not_empty(cls, text: str) -> str:
        if not text:
            raise ValueError("example text is empty")
        return text

    @property
    def labels(self) -> tuple[str, ...]:
        return (self.label,) if isinstance(self.label, str) else tuple(self.label)


class Task(_Strict):
    """Labels, instructions and answer shape for one classification problem."""

    name: str
    instructions: str = ""
    labels: tuple[Label, ...]
    multi_label: bool = False
    allow_abstain: bool = False
    examples: tuple[SeedExample, ...] = ()
    # The texts' language as an ISO 639 code ("en", "zh", "pt-BR"); empty: told from the texts. It chooses the
    # embedder of a new workspace (retrieval.choose_embedder): English gets the English one, any other the
    # multilingual one.
    language: str = ""

    @field_validator("language")
    @classmethod
    def _language_code(cls, language: str) -> str:
        if language and not re.fullmatch(r"[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})*", language):
            raise ValueError(f"language {language!r} is not a language code; write e.g. 'en', 'zh' or 'pt-BR'")
        return language

    @field_validator("name")
    @classmethod
    def _name_not_empty(cls, name: str) -> str:
        if not name:
            raise ValueError("task name is empty")
        return name

    @field_validator("labels", mode="before")
    @classmethod
    def _bare_names_are_labels(cls, labels: Any) -> Any:
        if isinstance(labels, list | tuple):
            return [{"name": label} if isinstance(label, str) else label for label in labels]
        return labels

    @model_validator(mode="after")
    def _labels_consistent(self) -> Task:
        minimum = 1 if self.multi_label else 2
        if len(self.labels) < minimum:
            raise ValueError(f"labels: a {'multi' if self.multi_label else 'single'}-label task needs at least {minimum} labels")
        seen: dict[str, int] = {}
        for i, label in enumerate(self.labels):
            key = label.name.casefold()
            if key in seen:
                raise ValueError(f"labels[{i}].name: duplicate label {label.name!r} (same as labels[{seen[key]}])")
            seen[key] = i
        names = set(self.label_names)
        for i, example in enumerate(self.examples):
            labels = example.labels
            if not labels:
                raise ValueError(f"examples[{i}].label: no label given")
            if len(labels) > 1 and not self.multi_label:
                raise ValueError(f"examples[{i}].label: {len(labels)} labels given but the task is single-label")
            for label in labels:
                if label not in names:
                    raise ValueError(f"examples[{i}].label: unknown label {label!r}; the task's labels are {sorted(names)}")
        return self

    @property
    def label_names(self) -> list[str]:
        return [label.name for label in self.labels]

    def seed_examples(self) -> list[tuple[str, tuple[str, ...]]]:
        """All seed texts with their labels: each label's own examples, then the task-level ones."""
        seeds = [(text, (label.name,)) for label in self.labels for text in label.examples]
        return seeds + [(example.text, example.labels) for example in self.examples]

    def check_labels(self, labels: Iterable[Sequence[str]]) -> None:
        """Refuse labels the task does not have, naming the first offending row."""
        names = set(self.label_names)
        for row, row_labels in enumerate(labels):
            unknown = [label for label in row_labels if label not in names]
            if unknown:
                raise TaskError(f"row {row}: unknown label {unknown[0]!r} for task {self.name!r}; known labels: {sorted(names)}")
            if len(row_labels) != 1 and not self.multi_label:
                raise TaskError(f"row {row}: {len(row_labels)} labels given but task {self.name!r} is single-label")

    def with_label(self, name: str, *, description: str = "", examples: Sequence[str] = ()) -> Task:
        """This task with one more label, last (so the old labels keep their positions), and its seed examples;
        TaskError when the name is taken or empty."""
        data = self.model_dump(mode="json")
        data["labels"].append({"name": name, "description": description, "examples": list(examples)})
        return Task.build(data, source=f"label {name!r}")

    @classmethod
    def from_labels(cls, names: Iterable[str], *, name: str = "task", multi_label: bool = False) -> Task:
        """A task with bare labels, e.g. the distinct labels of a training set."""
        return cls.build({"name": name, "labels": list(names), "multi_label": multi_label})

    @classmethod
    def build(cls, data: dict[str, Any], *, source: str = "task") -> Task:
        """Validate a task given as plain data, raising TaskError that names the field."""
        try:
            return cls.model_validate(data)
        except ValidationError as error:
            raise TaskError(_describe(error, source, lines=None)) from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> Task:
        """Load and validate a task file; errors name the file, line and field."""
        path = Path(path)
        try:
            if path.stat().st_size > MAX_TASK_BYTES:
                raise TaskError(f"{path}: {path.stat().st_size:,} bytes; a task file holds at most {MAX_TASK_BYTES:,} (the "
                                "labels and a few seed examples each): add more examples with `labelcascade add`")
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise TaskError(f"{path}: no such task file") from None
        except UnicodeDecodeError as error:
            raise TaskError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
        except OSError as error:
            raise TaskError(f"{path}: cannot read the task file ({error.strerror})") from None
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
            if shared := _aliased(node):
                raise TaskError(f"{path}: line {shared.start_mark.line + 1}: a YAML alias (*name) refers to this "
                                "value; task files may not use anchors and aliases: write the value out")
            data = yaml.safe_load(text)
        except RecursionError:
            raise TaskError(f"{path}: YAML nested too deeply to read; a task is a mapping of a few levels") from None
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f"line {mark.line + 1}: " if mark else ""
            raise TaskError(f"{path}: {where}not valid YAML: {getattr(error, 'problem', error)}") from None
        if not isinstance(data, dict):
            raise TaskError(f"{path}: a task file must be a YAML mapping with at least 'name' and 'labels'")
        labels = data.get("labels")
        for i, label in enumerate(labels if isinstance(labels, list) else []):
            name = label.get("name", "") if isinstance(label, dict) else label
            if isinstance(name, bool) or name is None:
                raise TaskError(f"{path}: line {_line_of(node, ['labels', i]) or '?'}: labels[{i}]: YAML reads an "
                                f"unquoted {'yes/no/on/off/true/false' if name is not None else 'null/~ or empty'} "
                                "as a value, not a label name: put the name in quotes ('yes')")
        if duplicate := _duplicate_key(node):
            raise TaskError(f"{path}: line {duplicate.start_mark.line + 1}: duplicate key {duplicate.value!r}")
        try:
            return cls.model_validate(data)
        except ValidationError as error:
            raise TaskError(_describe(error, str(path), lines=node)) from None

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(self.yaml_text(), encoding="utf-8")

    def yaml_text(self) -> str:
        data = self.model_dump(mode="json", exclude_defaults=True)
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _describe(error: ValidationError, source: str, lines: yaml.Node | None) -> str:
    """Turn pydantic's first error into 'file: line N: field: problem'."""
    first = error.errors()[0]
    loc = list(first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if not loc and (match := _FIELD_PREFIX.match(message)):
        # Checks across fields (duplicate labels, unknown example labels) put the field in their message.
        loc = [int(part) if part.isdigit() else part for part in re.findall(r"\w+", match.group(1))]
        message = message[match.end():]
    if first["type"] == "extra_forbidden":
        message = f"unknown key {loc[-1]!r}"
    elif first["type"] == "missing":
        message = "required field is missing"
    field = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
    line = _line_of(lines, loc) if lines is not None else None
    where = f"line {line}: " if line else ""
    return f"{source}: {where}{field + ': ' if field else ''}{message}"


_FIELD_PREFIX = re.compile(r"^([A-Za-z_]\w*(?:\[\d+\]|\.\w+)*): ")


def _aliased(node: yaml.Node | None) -> yaml.Node | None:
    """A node that the document reaches twice: the target of an alias. A task needs none, and a few nested aliases
    make a small file whose every walk (checking keys, validating) grows exponentially with the nesting."""
    seen: set[int] = set()
    stack = [] if node is None else [node]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            return current
        seen.add(id(current))
        if isinstance(current, yaml.MappingNode):
            stack.extend(part for pair in current.value for part in pair)
        elif isinstance(current, yaml.SequenceNode):
            stack.extend(current.value)
    return None


def _duplicate_key(node: yaml.Node) -> yaml.Node | None:
    """The first key that appears twice in one mapping; YAML loaders keep the last silently, hiding a mistake."""
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key, value in node.value:
            if key.value in seen:
                return key
            seen.add(key.value)
            if found := _duplicate_key(value):
                return found
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            if found := _duplicate_key(item):
                return found
    return None


def _line_of(node: yaml.Node, loc: Sequence[Any]) -> int | None:
    """The 1-based line of the YAML node at `loc` (or of its nearest existing parent)."""
    line = node.start_mark.line + 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = [value for key, value in node.value if key.value == part]
            keys = [key for key, _ in node.value if key.value == part]
            if not match:
                break
            line, node = keys[0].start_mark.line + 1, match[0]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line
