"""The real embedded LLM (Gemma 3 270M through llama.cpp), loaded once for the agent's tests."""

import pytest

from labelcascade.agent.engines.llamacpp import LlamaCppEngine


@pytest.fixture(scope="session")
def gemma():
    engine = LlamaCppEngine()
    yield engine
    engine.close()
