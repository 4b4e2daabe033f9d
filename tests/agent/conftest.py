"""The real embedded LLM (Gemma 3 270M through llama.cpp), loaded once for the agent's tests."""

import json

import pytest

from labelcascade.agent.engines.llamacpp import LlamaCppEngine

from ..conftest import EXAMPLES

BANKING_TASK = EXAMPLES / "banking" / "task.yaml"


def banking_messages() -> tuple[list[str], list[str]]:
    """The example's 40 held-out messages (BANKING77 test texts) and their labels."""
    with (EXAMPLES / "banking" / "messages.jsonl").open(encoding="utf-8") as file:
        rows = [json.loads(line) for line in file]
    return [row["text"] for row in rows], [row["label"] for row in rows]


@pytest.fixture(scope="session")
def gemma():
    engine = LlamaCppEngine()
    yield engine
    engine.close()
