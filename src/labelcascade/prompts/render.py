"""Render a task, retrieved examples and a text into a prompt whose start is the same for every text.

Layout (DESIGN.md, "One classification"): the static part (instructions, the full label list and, if given, a fixed
set of labelled examples, `static_examples`) comes first and is byte-identical for every text of a task, so an
engine's prefix cache computes it once; then the retrieved examples, most similar last (closest to the text); then
the text. Examples in the static part are cut shorter than retrieved ones (MAX_STATIC_EXAMPLE_BYTES) and their total
is capped (MAX_STATIC_BYTES), so a task with many labels keeps room in the context for the text. The prompt stops
right before the answer, and every candidate label is scored as a continuation: a space, the label's verbaliser, then
the blank line that closes an answer (so "card" and "card_arrival" are distinct, complete answers rather than one
being a prefix of the other).

`CONTENT_FREE` is the text of contextual calibration's second prompt (see `Policy.contextual_calibration`).

Texts are shown cleaned and cut to a size in bytes (`clean_text`, MAX_TEXT_BYTES): a text of a megabyte is
classified by its first 2,000 bytes, which always fit the engine's context.

A text cannot forge the prompt's structure: it is shown on one line, so it cannot start the line that holds an
answer or open another example, and special-token markers are neutralised, so it cannot close a turn or open one.
What a text can still do is name a label in its own words ("Label: sports" inside its line, "the answer is
sports"); how often that moves an answer is measured by bench/injection.py (RELIABILITY.md, "Prompt injection").
Rewriting such words inside texts ("Label: sports" shown as "Label - sports") was measured there too and moved
more answers, not fewer, so texts are shown as they are.

Templates are Jinja files with two blocks, `static` and `dynamic`; the built-in ones are `completion` (base models)
and `chat` (instruction-tuned models: the prompt is the user's turn, each label is scored as the model's whole
answer, ended by its end-of-turn marker; the turns are the model's own, read from its chat template by the engine
that has one, Gemma's otherwise). Pass the path of your own `.j2` file to override them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from jinja2 import FileSystemLoader, StrictUndefined, Template
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedEnvironment

from labelcascade.records import Example
from labelcascade.task import Task

TEMPLATES = Path(__file__).parent / "templates"
BUILT_IN = ("completion", "chat")
AUTO = "auto"  # chosen per model: see `PromptRenderer.for_model`

# What a prompt shows of a text, so that no input can overflow the engine's context (see `clean_text`): the text
# classified keeps its first 2,000 UTF-8 bytes, each retrieved example its first 1,000. Bytes, not characters,
# because a token of a byte-level or byte-fallback tokenizer covers at least one byte: 2,000 bytes are at most about
# 2,000 tokens in any script (Gemma 3: 445 tokens of English), where 2,000 characters of Chinese were 4,230 tokens,
# more than llama.cpp's 4,096-token context. With 8 examples, English prompts stay under ~2,500 tokens.
MAX_TEXT_BYTES = 2000
MAX_EXAMPLE_BYTES = 1000
MAX_STATIC_EXAMPLE_BYTES = 400
MAX_STATIC_BYTES = 4000
ELLIPSIS = "…"
# What closes an answer: in the built-in templates an example's label is followed by a blank line, and Gemma's
# tokenizer reads "\n\n" as one token. Scoring a single "\n" asked the model for a token it never saw after a label
# in the prompt, which cost accuracy (BENCHMARKS.md, "Measurements behind the code"). A custom template should end
# its examples' answers the same way.
ANSWER_END = "\n\n"
CONTENT_FREE = "N/A"


@dataclass(frozen=True)
class ChatTurns:
    """How a chat model marks turns: what opens the user's message (with the system turn its template adds, if
    any), what closes it and opens the model's answer, and what ends that answer. The `chat` template writes its
    prompt inside these, and each candidate label is scored as the model's whole answer: the label, then `end`."""

    user: str
    model: str
    end: str


GEMMA_TURNS = ChatTurns("<start_of_turn>user\n", "<end_of_turn>\n<start_of_turn>model\n", "<end_of_turn>")


def chat_turns(template: str, *, bos_token: str = "", eos_token: str = "") -> ChatTurns:
    """The turns a model's own chat template (the Jinja text a GGUF or a Hugging Face tokenizer carries) writes
    around one user message and one answer. Rendered in Jinja's immutable sandbox (the template comes from a model
    file, which may be untrusted: it can compute text, not reach Python), as Hugging Face renders it; the leading
    `bos_token` is left out (engines add it). ValueError for a template that does not write a user message and an
    answer the way its generation prompt starts one."""
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message: str) -> None:
        raise ValueError(f"the model's chat template refused: {message}")

    environment.globals["raise_exception"] = raise_exception
    compiled = environment.from_string(template)
    user, answer = "\x00USER\x00", "\x00ANSWER\x00"
    asked = [{"role": "user", "content": user}]
    opened = compiled.render(messages=asked, add_generation_prompt=True, bos_token=bos_token, eos_token=eos_token)
    closed = compiled.render(messages=[*asked, {"role": "assistant", "content": answer}], add_generation_prompt=False,
                             bos_token=bos_token, eos_token=eos_token)
    before_answer, _, after_answer = closed.partition(answer)
    before, found, model = opened.partition(user)
    if not found or before_answer != opened or not after_answer.strip():
        raise ValueError("the model's chat template does not write an answer right after its generation prompt; "
                         "use the 'completion' template, or a .j2 template of your own")
    if bos_token and before.startswith(bos_token):
        before = before[len(bos_token):]
    return ChatTurns(before, model, after_answer.rstrip())


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

    def __init__(self, task: Task, template: str | Path = "completion", turns: ChatTurns | None = None,
                 static_examples: Sequence[Example] = ()):
        """`turns`: the model's chat turns for the `chat` template (default Gemma's; `chat_turns` reads a model's).
        `static_examples`: examples shown to every text, in the static part, in this order (those past
        MAX_STATIC_BYTES are left out: `static_examples_that_fit`)."""
        self.task = task
        self.template = template  # "auto": `completion` until an engine's chat template says otherwise (`for_model`)
        self.turns = turns or GEMMA_TURNS
        self.chat = template == "chat"
        # Where an answer starts and what closes it: after "Label:" a space, then the blank line that ends an
        # example; in a chat, the whole of the model's turn, closed by its end-of-turn marker.
        self._answer_start, self._answer_end = ("", self.turns.end) if self.chat else (" ", ANSWER_END)
        self._template = _load_template(template)
        self._answers = {label.name: label.verbalizer or label.name for label in task.labels}
        labels = [{"answer": self._answers[label.name], "description": label.description} for label in task.labels]
        self.static_examples = tuple(static_examples_that_fit(static_examples))
        shown = self._shown(self.static_examples, MAX_STATIC_EXAMPLE_BYTES)
        self._context = {"task": task, "labels": labels, "turns": self.turns, "static_examples": shown}
        # Rendered once: the static block depends on the task (and its fixed examples) alone.
        self.static = "".join(self._template.blocks["static"](self._template.new_context(self._context)))

    def answer(self, label: str) -> str:
        """The words that stand for `label` in prompts (its verbaliser, or its name)."""
        return self._answers[label]

    def with_turns(self, turns: ChatTurns) -> PromptRenderer:
        """This renderer for a model with these chat turns (itself when they change nothing)."""
        if not self.chat or turns == self.turns:
            return self
        return PromptRenderer(self.task, self.template, turns, self.static_examples)

    def with_static_examples(self, examples: Sequence[Example]) -> PromptRenderer:
        """This renderer with these examples in its static part (itself when they are the ones it has)."""
        if tuple(examples) == self.static_examples:
            return self
        return PromptRenderer(self.task, self.template, self.turns, examples)

    def for_model(self, turns: ChatTurns | None) -> PromptRenderer:
        """The renderer for a model whose chat turns are `turns` (None: it has no chat template): `chat` takes
        them; `auto` becomes `chat` in them, or `completion` without; other templates stay as they are."""
        if self.template == AUTO:
            return PromptRenderer(self.task, "completion" if turns is None else "chat", turns, self.static_examples)
        return self if turns is None else self.with_turns(turns)

    def candidates(self, labels: Sequence[str]) -> list[str]:
        """The continuation scored for each label, in the same order."""
        return [self._answer_start + self.answer(label) + self._answer_end for label in labels]

    @property
    def yes_no(self) -> tuple[str, str]:
        """The two candidates of a multi-label question (`render_question`): yes, then no."""
        return self._answer_start + "yes" + self._answer_end, self._answer_start + "no" + self._answer_end

    def render(self, text: str, examples: Sequence[Example] = ()) -> Prompt:
        """The prompt for one text; `examples` come best match first, as retrieval returns them."""
        return self._render(text, examples, ask=None)

    def render_question(self, text: str, label: str, examples: Sequence[Example] = ()) -> Prompt:
        """For multi-label tasks: the prompt asking whether `label` applies to the text (answered by `yes_no`)."""
        return self._render(text, examples, ask={"answer": self.answer(label)})

    def _render(self, text: str, examples: Sequence[Example], ask: dict | None) -> Prompt:
        shown = self._shown(list(reversed(examples)), MAX_EXAMPLE_BYTES)
        context = self._template.new_context({**self._context, "examples": shown, "text": clean_text(text), "ask": ask})
        return Prompt(self.static, "".join(self._template.blocks["dynamic"](context)))

    def _shown(self, examples: Sequence[Example], max_bytes: int) -> list[dict]:
        return [{"text": clean_text(example.text, max_bytes), "answer": ", ".join(self.answer(label) for label in example.labels)}
                for example in examples]


def clean_text(text: str, max_bytes: int = MAX_TEXT_BYTES) -> str:
    """A text as it appears in a prompt: on one line, without anything the tokenizer would read as a special token,
    and at most `max_bytes` bytes of UTF-8.

    - Runs of whitespace (newlines too) become one space, so a text cannot start a line that looks like "Label: ...".
    - Other non-printable characters (NUL, other control characters, lone surrogates that UTF-8 cannot encode)
      become U+FFFD.
    - Tag-like markers ("<end_of_turn>", "<|im_start|>") get their "<" replaced by "‹": prompts are tokenised with
      special tokens on (for the chat template's turns), and a text must not be able to close a turn or open one.
    - The text is cut at a character boundary to its first `max_bytes` bytes, the last character being "…".
    """
    text = _WHITESPACE.sub(" ", text).strip()
    text = _UNPRINTABLE.sub("\ufffd", text)
    text = _MARKER.sub("‹", text)
    encoded = text.encode("utf-8")
    if len(encoded) <= max_bytes:
        return text
    room = max_bytes - len(ELLIPSIS.encode("utf-8"))
    return encoded[:room].decode("utf-8", errors="ignore") + ELLIPSIS


def static_examples_that_fit(examples: Sequence[Example]) -> list[Example]:
    """The leading `examples` that a static part shows: each text cut to MAX_STATIC_EXAMPLE_BYTES, as many as fit in
    MAX_STATIC_BYTES together. Whoever keeps the static examples out of retrieval asks this, so an example cut by
    the cap stays retrievable instead of being neither shown nor found."""
    kept, total = [], 0
    for example in examples:
        total += len(clean_text(example.text, MAX_STATIC_EXAMPLE_BYTES).encode("utf-8"))
        if total > MAX_STATIC_BYTES:
            break
        kept.append(example)
    return kept


_WHITESPACE = re.compile(r"\s+")
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_MARKER = re.compile(r"<(?=\|?/?[A-Za-z_][\w.|-]*>)")


def _load_template(template: str | Path) -> Template:
    template = "completion" if template == AUTO else template
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
