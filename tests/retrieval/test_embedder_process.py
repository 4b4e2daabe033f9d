"""The embedder in child processes (the service's): the same vectors as in this process, in the caller's order;
texts sent ahead are collected by the call that asks for them and dropped by any other; a child that dies is
replaced; a model that cannot load is named; a batch is cut into runs of about equal cost."""

import numpy as np
import pytest

from labelcascade import Session
from labelcascade.retrieval.embedder_process import (
    RUN_OVERHEAD_CHARS,
    EmbedderProcess,
    EmbedderProcessError,
    balanced_cuts,
)

from ..conftest import BANKING_TASK, held_out

slow = pytest.mark.slow  # child processes that each load the model


@pytest.fixture(scope="module")
def process_embedder():
    with EmbedderProcess("default", workers=2) as embedder:
        yield embedder


@slow
def test_the_vectors_are_the_ones_made_here_in_the_callers_order(process_embedder, embedder):
    texts, _ = held_out("banking77", 37)  # more than one run per child, of mixed lengths
    assert process_embedder.id == embedder.id and process_embedder.dim == embedder.dim
    assert np.allclose(process_embedder.embed(texts), embedder.embed(texts), atol=1e-5)
    assert np.allclose(process_embedder.embed(texts[:1]), embedder.embed(texts[:1]), atol=1e-5)
    assert process_embedder.embed([]).shape == (0, embedder.dim)
    with pytest.raises(TypeError, match="wrap a single text in a list"):
        process_embedder.embed("one text")


@slow
def test_a_session_answers_the_same_through_it(process_embedder, embedder, tmp_path):
    Session.create(BANKING_TASK, workspace=tmp_path / "ws", embedder=embedder, engine=None).close()
    texts, _ = held_out("banking77", 12)
    with Session.open(tmp_path / "ws", embedder=embedder) as here, \
            Session.open(tmp_path / "ws", embedder=process_embedder) as there:
        assert [(p.label, round(p.confidence, 4)) for p in there.classify(texts, learn=False)] == \
            [(p.label, round(p.confidence, 4)) for p in here.classify(texts, learn=False)]


@slow
def test_a_child_that_dies_is_replaced_and_the_call_answered(process_embedder, embedder):
    texts, _ = held_out("banking77", 9)
    dead = process_embedder._children[1].process
    dead.kill()
    dead.wait()
    assert np.allclose(process_embedder.embed(texts), embedder.embed(texts), atol=1e-5)
    assert all(child.process.poll() is None for child in process_embedder._children)


@slow
def test_a_model_that_cannot_load_is_named(tmp_path):
    with pytest.raises(EmbedderProcessError, match=r"embedder '.*nothing-here': FileNotFoundError: .*no such folder"):
        EmbedderProcess(str(tmp_path / "nothing-here"), workers=1)


@slow
def test_texts_sent_ahead_are_collected_by_the_call_for_them_and_dropped_by_any_other(process_embedder, embedder):
    texts, _ = held_out("banking77", 30)
    first, second = texts[:20], texts[20:]
    idle = []
    process_embedder.on_idle = lambda: idle.append(True)
    try:
        assert process_embedder.embed_soon(first)
        assert not process_embedder.embed_soon(second)  # one batch ahead at a time
        assert np.allclose(process_embedder.embed(first), embedder.embed(first), atol=1e-5)
        assert process_embedder.embed_soon(first)
        assert np.allclose(process_embedder.embed(second), embedder.embed(second), atol=1e-5)  # `first` dropped
        assert np.allclose(process_embedder.embed(first), embedder.embed(first), atol=1e-5)
        assert idle == [True] * 3  # once per call that returned vectors
        assert not process_embedder.embed_soon([])
    finally:
        process_embedder.on_idle = None


@slow
def test_a_child_that_dies_while_texts_are_sent_ahead_is_replaced_and_the_call_answered(process_embedder, embedder):
    texts, _ = held_out("banking77", 11)
    assert process_embedder.embed_soon(texts)
    dead = process_embedder._children[0].process
    dead.kill()
    dead.wait()
    assert np.allclose(process_embedder.embed(texts), embedder.embed(texts), atol=1e-5)
    # (had the child written its answer before it was killed, the answer counts and this call finds it gone)
    assert np.allclose(process_embedder.embed(texts[:5]), embedder.embed(texts[:5]), atol=1e-5)
    assert all(child.process.poll() is None for child in process_embedder._children)


def cost(lengths: np.ndarray, cuts: list[int]) -> float:
    """The largest cost of the runs `cuts` makes: texts times the longest, plus a fixed cost per run."""
    bounds = [0, *cuts, len(lengths)]
    return max((end - start) * lengths[end - 1] + RUN_OVERHEAD_CHARS for start, end in zip(bounds, bounds[1:]))


def test_runs_are_cut_to_cost_about_the_same_not_to_hold_the_same_count():
    rng = np.random.default_rng(0)
    for count, runs in [(2, 2), (9, 2), (16, 2), (37, 2), (37, 3), (256, 4)]:
        lengths = np.sort(rng.integers(10, 300, size=count))
        cuts = balanced_cuts(lengths, runs)
        assert cuts == sorted(set(cuts)) and all(0 < cut < count for cut in cuts) and len(cuts) <= runs - 1
        equal_counts = [int(part[-1]) + 1 for part in np.array_split(np.arange(count), runs)][:-1]
        assert cost(lengths, cuts) <= cost(lengths, equal_counts)
    # the long texts get fewer places than the short ones
    assert balanced_cuts(np.array([5, 6, 7, 8, 9, 10, 50, 80]), 2) == [6]
    assert balanced_cuts(np.full(8, 10), 2) == [4]
    assert balanced_cuts(np.array([10, 20]), 1) == [] and balanced_cuts(np.array([10]), 4) == []
