"""The embedder in child processes (the service's): the same vectors as in this process, in the caller's order;
a child that dies is replaced; a model that cannot load is named; nothing but messages crosses the pipes."""

import numpy as np
import pytest

from labelcascade import Session
from labelcascade.retrieval.embedder_process import EmbedderProcess, EmbedderProcessError

from ..conftest import BANKING_TASK, held_out

pytestmark = pytest.mark.slow  # child processes that each load the model


@pytest.fixture(scope="module")
def process_embedder():
    with EmbedderProcess("default", workers=2) as embedder:
        yield embedder


def test_the_vectors_are_the_ones_made_here_in_the_callers_order(process_embedder, embedder):
    texts, _ = held_out("banking77", 37)  # more than one run per child, of mixed lengths
    assert process_embedder.id == embedder.id and process_embedder.dim == embedder.dim
    assert np.allclose(process_embedder.embed(texts), embedder.embed(texts), atol=1e-5)
    assert np.allclose(process_embedder.embed(texts[:1]), embedder.embed(texts[:1]), atol=1e-5)
    assert process_embedder.embed([]).shape == (0, embedder.dim)
    with pytest.raises(TypeError, match="wrap a single text in a list"):
        process_embedder.embed("one text")


def test_a_session_answers_the_same_through_it(process_embedder, embedder, tmp_path):
    Session.create(BANKING_TASK, workspace=tmp_path / "ws", embedder=embedder, engine=None).close()
    texts, _ = held_out("banking77", 12)
    with Session.open(tmp_path / "ws", embedder=embedder) as here, \
            Session.open(tmp_path / "ws", embedder=process_embedder) as there:
        assert [(p.label, round(p.confidence, 4)) for p in there.classify(texts, learn=False)] == \
            [(p.label, round(p.confidence, 4)) for p in here.classify(texts, learn=False)]


def test_a_child_that_dies_is_replaced_and_the_call_answered(process_embedder, embedder):
    texts, _ = held_out("banking77", 9)
    dead = process_embedder._children[1].process
    dead.kill()
    dead.wait()
    assert np.allclose(process_embedder.embed(texts), embedder.embed(texts), atol=1e-5)
    assert all(child.process.poll() is None for child in process_embedder._children)


def test_a_model_that_cannot_load_is_named(tmp_path):
    with pytest.raises(EmbedderProcessError, match=r"embedder '.*nothing-here': FileNotFoundError: .*no such folder"):
        EmbedderProcess(str(tmp_path / "nothing-here"), workers=1)
