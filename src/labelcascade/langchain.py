"""The LangChain front door: a session as a Runnable for chains and as a tool for agents.

    from labelcascade.langchain import as_runnable, as_tool

    chain = as_runnable(clf) | RunnableLambda(lambda p: p.label)   # str or {"text": str} in, Prediction out
    chain.batch(texts)                                                # one clf.classify(texts) for the whole batch
    agent_tools = [as_tool(clf)]                                      # {"text": str} in, JSON-ready dict out

The runnable returns the `Prediction` every front door returns, so the steps after it read typed fields
(`p.label`, `p.confidence`, `p.route`) and LangChain derives its output schema from the model. The tool returns
a plain dict instead, because an agent's tool result travels to the LLM as JSON.

Its `batch` is not LangChain's default (one `invoke` per input on a thread pool): the cascade embeds a batch at
once and sends its unsure texts to the LLM together, so the whole batch goes to `classify` in one call.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, Field
from typing_extensions import TypedDict  # not typing's: on Python 3.11 pydantic builds schemas only from this one

try:
    from langchain_core.runnables import Runnable, RunnableConfig
    from langchain_core.runnables.config import run_in_executor
    from langchain_core.tools import BaseTool, StructuredTool
except ImportError as error:  # an optional extra: the rest of labelcascade works without it
    raise ImportError("labelcascade.langchain needs langchain-core: pip install 'labelcascade[langchain]'") from error

from labelcascade.session import Session
from labelcascade.records import Prediction
from labelcascade.task import Task

TOP = 3  # label probabilities in a tool result: enough for an agent to see a close second, short enough to read


class TextInput(TypedDict):
    """The dict form of the runnable's input, the same payload the tool takes, so either composes after a step
    that builds {"text": ...}."""

    text: str


class ClassifyArgs(BaseModel):
    """The tool's arguments, as the agent's LLM sees them."""

    text: str = Field(min_length=1, description="The text to classify, as the user wrote it.")


class SessionRunnable(Runnable[str | TextInput, Prediction]):
    """A `Session` as a LangChain Runnable; build it with `as_runnable`."""

    def __init__(self, session: Session):
        self.session = session
        self.name = f"labelcascade:{session.task.name}"

    def invoke(self, input: str | TextInput, config: RunnableConfig | None = None, **kwargs: Any) -> Prediction:
        return self._call_with_config(lambda value: self.session.classify(_text(value)), input, config)

    def batch(
        self,
        inputs: list[str | TextInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[Prediction]:
        """Classify all inputs in one `classify` call; each input still gets its own callback run."""
        return self._batch_with_config(self._classify_all, inputs, config, return_exceptions=return_exceptions)

    async def abatch(
        self,
        inputs: list[str | TextInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[Prediction]:
        """`batch` on an executor thread: one `classify` call, the event loop free meanwhile."""

        async def classify_all(values: list[str | TextInput]) -> list[Prediction | Exception]:
            return await run_in_executor(None, self._classify_all, values)

        return await self._abatch_with_config(classify_all, inputs, config, return_exceptions=return_exceptions)

    def _classify_all(self, values: list[str | TextInput]) -> list[Prediction | Exception]:
        """Predictions in input order; a malformed input becomes its own error without failing the others, as
        `batch(..., return_exceptions=True)` expects."""
        texts: list[str | Exception] = []
        for value in values:
            try:
                texts.append(_text(value))
            except TypeError as error:
                texts.append(error)
        answers = iter(self.session.classify([text for text in texts if isinstance(text, str)]))
        return [text if isinstance(text, Exception) else next(answers) for text in texts]


def as_runnable(session: Session) -> Runnable[str | TextInput, Prediction]:
    """The session as a Runnable: a text (or {"text": ...}) in, a `Prediction` out; `batch` and `abatch`
    classify the whole batch in one call."""
    return SessionRunnable(session)


def as_tool(session: Session, name: str | None = None, description: str | None = None) -> BaseTool:
    """The session as a LangChain tool taking {"text": ...}. Its default name and description come from the
    task (its name, instructions, labels and their descriptions), so an agent can tell when to call it; it
    returns {"label", "labels", "confidence", "route", "top": [{"label", "probability"}, ...]}."""
    task = session.task
    return StructuredTool.from_function(
        func=lambda text: session.classify(text).summary(TOP),
        name=name or _tool_name(task),
        description=description or _describe(task),
        args_schema=ClassifyArgs,
    )


def _text(value: str | TextInput) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("text"), str):
        return value["text"]
    raise TypeError(f"expected a text or a dict with a 'text' string, got {type(value).__name__}: {value!r:.80}")


def _tool_name(task: Task) -> str:
    """`classify_<task name>` in the characters and length that LLM providers accept for a tool name."""
    return ("classify_" + re.sub(r"[^A-Za-z0-9_-]+", "_", task.name))[:64]


def _describe(task: Task) -> str:
    """What an agent's LLM reads to decide when to call the tool and how to read its answer."""
    labels = "; ".join(
        f"{label.name} ({label.description.rstrip('.')})" if label.description else label.name for label in task.labels
    )
    answer = "every label that applies, in 'labels'" if task.multi_label else "one label, in 'label'"
    if task.allow_abstain:
        answer += " (none when no label fits)"
    sentences = [
        f"Classify a text for the task '{task.name}'.",
        task.instructions.strip(),
        f"Labels: {labels}.",
        f"Returns {answer}, its confidence (0 to 1), the route that answered (fallback, llm, degraded or abstain) "
        "and the most probable labels with their probabilities.",
    ]
    return " ".join(sentence for sentence in sentences if sentence)


__all__ = ["as_runnable", "as_tool"]
