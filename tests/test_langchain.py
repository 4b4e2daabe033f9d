"""The LangChain front door through LangChain's own interfaces: the tool as an agent calls it, the runnable in
chains and batches (one `classify` call per batch, counted on the real session), and the chat router example
end to end."""

import asyncio
import json
import subprocess
import sys

import pytest
from langchain_core.messages import ToolMessage
from langchain_core.runnables import RunnableLambda
from pydantic import ValidationError

from labelcascade import Session, Prediction
from labelcascade.langchain import as_runnable, as_tool

from .conftest import BANKING_TASK, EXAMPLES, REPO, banking_messages


class CountingSession(Session):
    """The real session, recording what each `classify` call was given."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list = []

    def classify(self, texts):
        self.calls.append(texts)
        return super().classify(texts)


@pytest.fixture(scope="module")
def session(embedder):
    session = CountingSession.create(BANKING_TASK, embedder=embedder, engine=None)
    yield session
    session.close()


def test_tool_answers_like_the_classifier_and_describes_the_task(session):
    tool = as_tool(session)
    assert tool.name == "classify_banking-support"
    assert tool.args == {"text": {"description": "The text to classify, as the user wrote it.", "minLength": 1,
                                  "title": "Text", "type": "string"}}
    for label in session.task.labels:
        assert f"{label.name} ({label.description.rstrip('.')})" in tool.description
    assert "Route a bank customer's message" in tool.description
    texts, _ = banking_messages()
    for text in texts[:5]:
        result = tool.invoke({"text": text})
        expected = session.classify(text)
        assert result["label"] == expected.label and result["route"] == expected.route.value
        assert [top["label"] for top in result["top"]][0] == expected.label and len(result["top"]) == 3
        assert json.loads(json.dumps(result)) == result
    call = {"type": "tool_call", "id": "call-1", "name": tool.name, "args": {"text": "my card got stolen"}}
    message = tool.invoke(call)  # as an agent's tool node calls it: the answer reaches the LLM as JSON
    assert isinstance(message, ToolMessage) and message.tool_call_id == "call-1"
    assert json.loads(message.content)["label"] == "lost_or_stolen_card"


def test_tool_name_and_description_can_be_given(session):
    tool = as_tool(session, name="route_intent", description="Which banking intent a message expresses.")
    assert (tool.name, tool.description) == ("route_intent", "Which banking intent a message expresses.")
    with pytest.raises(ValidationError, match="text"):
        tool.invoke({"text": ""})


def test_runnable_invoke_takes_a_text_or_a_dict(session):
    runnable = as_runnable(session)
    by_text = runnable.invoke("my card got stolen")
    by_dict = runnable.invoke({"text": "my card got stolen"})
    assert isinstance(by_text, Prediction) and by_text.label == by_dict.label == "lost_or_stolen_card"
    assert runnable.get_input_jsonschema()["anyOf"][0] == {"type": "string"}
    assert runnable.get_output_jsonschema()["title"] == "Prediction"
    with pytest.raises(TypeError, match="'text' string"):
        runnable.invoke({"message": "my card got stolen"})


def test_batch_classifies_the_whole_batch_in_one_call(session):
    runnable = as_runnable(session)
    texts, _ = banking_messages()
    expected = [p.label for p in session.classify(texts)]
    session.calls.clear()
    assert [p.label for p in runnable.batch(texts)] == expected
    assert session.calls == [texts]
    session.calls.clear()
    assert [p.label for p in asyncio.run(runnable.abatch([{"text": t} for t in texts]))] == expected
    assert session.calls == [texts]
    session.calls.clear()
    answers = runnable.batch([texts[0], {"message": texts[1]}, texts[2]], return_exceptions=True)
    assert [a.label for a in answers[::2]] == [expected[0], expected[2]] and isinstance(answers[1], TypeError)
    assert session.calls == [[texts[0], texts[2]]]


def test_runnable_composes_with_langchain_steps(session):
    chain = as_runnable(session) | RunnableLambda(lambda p: p.label if p.confidence >= 0.5 else "human")
    assert chain.invoke("my card got stolen") == "lost_or_stolen_card"
    session.calls.clear()
    assert chain.batch(["my card got stolen", "what is the exchange rate for euros"]) == [
        "lost_or_stolen_card", "exchange_rate"]
    assert len(session.calls) == 1  # the sequence hands the whole batch to the session's batch


@pytest.mark.slow
def test_chat_router_replies_to_every_message_with_the_embedded_llm(tmp_path):
    """The example as a user runs it, on the embedded default (Gemma 3 270M through llama.cpp)."""
    messages = tmp_path / "messages.txt"
    messages.write_text("my card got stolen\nhello, is anyone there?\nwhy was I charged for taking out cash?\n")
    result = subprocess.run([sys.executable, str(EXAMPLES / "chat_router.py"), "--messages", str(messages)],
                            capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line[5:] for line in lines if line.startswith("you: ")] == messages.read_text().splitlines()
    replies = [line for line in lines if line.startswith("bot: ")]
    routes = [line.rsplit("route ", 1)[1].rstrip("]") for line in lines if line.startswith("     [")]
    assert len(replies) == len(routes) == 3 and all(len(reply) > len("bot: ") for reply in replies)
    assert set(routes) <= {"fallback", "llm", "abstain"}, routes  # "degraded" would mean the LLM failed
    assert "Let's sort out your card" in replies[0]
