"""Render a task, retrieved examples and a text into a prompt whose start is the same for every text.

Layout (DESIGN.md, "One classification"): the static part (instructions, the full label list) comes first and is
byte-identical for every text of a task, so an engine's prefix cache reuses it; then the retrieved examples, most
similar last (closest to the text); then the text. The prompt stops right before the answer, and every candidate
label is scored as a continuation: a space, the label's verbaliser, then a newline that closes the answer (so
"card" and "card_arrival" are distinct, complete answers rather than one being a prefix of the other).

Templates are Jinja files with two blocks, `static` and `dynamic`; the built-in ones are `completion` (base models)
and `chat` (Gemma-style turns). Pass the path of your own `.j2` file to override them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from jinja2 import FileSystemLoader, StrictUndefined, Template
from jinja2.sandbox import SandboxedEnvironment

from labelcascade.records import Example
from labelcascade.task import Task

TEMPLATES = Path(__file__).parent / "templates"
BUILT_IN = ("completion", "chat")

# Texts longer than this many characters are cut to their start in prompts (and marked with an ellipsis), so one
# huge input cannot overflow the engine's context; 2,000 characters is about 500 tokens.
MAX_TEXT_CHARS = 2000
ANSWER_END = "\n"
YES, NO = " yes" + ANSWER_END, " no" + ANSWER_END  # the two candidates of a multi-label yes/no question


@dataclass(frozen=True)
class Prompt:
    """A rendered prompt: the part shared by all texts of the task, and the part for this text."""

    static: str
    dynamic: str

    @property
    def text(self) -> str:
        return self.static + self.dynamic


class PromptRenderer:
    """Renders prompts for one task with one template."""

    def __init__(self, task: Task, template: str | Path = "completion"):
        self.task = task
        self._template = _load_template(template)
        self._answers = {label.name: label.verbalizer or label.name for label in task.labels}
        labels = [{"answer": self._answers[label.name], "description": label.description} for label in task.labels]
        self._context = {"task": task, "labels": labels}
        # Rendered once: the static block depends on the task alone.
        self.static = "".join(self._template.blocks["static"](self._template.new_context(self._context)))

    def answer(self, label: str) -> str:
        """The words that stand for `label` in prompts (its verbaliser, or its name)."""
        return self._answers[label]

    def candidates(self, labels: Sequence[str]) -> list[str]:
        """The continuation scored for each label, in the same order."""
        return [" " + self.answer(label) + ANSWER_END for label in labels]

    def render(self, text: str, examples: Sequence[Example] = ()) -> Prompt:
        """The prompt for one text; `examples` come best match first, as retrieval returns them."""
        return self._render(text, examples, ask=None)

    def render_question(self, text: str, label: str, examples: Sequence[Example] = ()) -> Prompt:
        """For multi-label tasks: the prompt asking whether `label` applies to the text (answered by YES or NO)."""
        return self._render(text, examples, ask={"answer": self.answer(label)})

    def _render(self, text: str, examples: Sequence[Example], ask: dict | None) -> Prompt:
        shown = [
            {"text": clean_text(example.text), "answer": ", ".join(self.answer(label) for label in example.labels)}
            for example in reversed(examples)
        ]
        context = self._template.new_context({**self._context, "examples": shown, "text": clean_text(text), "ask": ask})
        return Prompt(self.static, "".join(self._template.blocks["dynamic"](context)))


def clean_text(text: str) -> str:
    """A text as it appears in a prompt: whitespace runs (newlines too) become one space, then cut to MAX_TEXT_CHARS.

    Keeping each text on one line means a text cannot start a line of its own that looks like "Label: ...".
    """
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= MAX_TEXT_CHARS else text[: MAX_TEXT_CHARS - 1] + "…"


def _load_template(template: str | Path) -> Template:
    if isinstance(template, str) and template in BUILT_IN:
        path = TEMPLATES / f"{template}.j2"
    else:
        path = Path(template)
        if not path.is_file():
            raise FileNotFoundError(f"prompt template {template!r}: no such file; use one of {BUILT_IN} or a .j2 path")
    environment = SandboxedEnvironment(
        loader=FileSystemLoader(path.parent), undefined=StrictUndefined, keep_trailing_newline=True, autoescape=False
    )
    loaded = environment.get_template(path.name)
    missing = {"static", "dynamic"} - set(loaded.blocks)
    if missing:
        raise ValueError(f"{path}: a prompt template needs the blocks 'static' and 'dynamic'; missing {sorted(missing)}")
    return loaded
