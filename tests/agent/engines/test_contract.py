"""The contract every engine keeps, checked the same way on each one available: llama.cpp (the packaged GGUF), the
transformers engine and a vLLM server (the same model as a Hugging Face checkpoint). vLLM in-process runs in its
own environment and is checked by test_vllm_offline.py."""

import copy

import pytest

from labelcascade.agent.engines import EngineError, EngineTimeout, ScoringEngine, load_engine
from labelcascade.prompts import PromptRenderer
from labelcascade.task import Task

from ...conftest import EXAMPLES
from .conftest import assert_log_probabilities

BANKING = Task.from_yaml(EXAMPLES / "banking" / "task.yaml")
# How far the same prompts may score apart after a reset: in-process engines repeat themselves to the bit; a server
# serves the second time from its prefix cache, with other kernels.
REPEAT_TOLERANCE = {"llamacpp": 0.0, "transformers": 0.0, "vllm": 1e-3}


@pytest.fixture(scope="module", params=list(REPEAT_TOLERANCE))
def engine(request):
    if request.param == "llamacpp":
        yield request.getfixturevalue("gemma")
        return
    if request.param == "transformers":
        engine = load_engine(f"transformers:{request.getfixturevalue('hf_model')}")
    else:
        engine = load_engine(f"vllm:{request.getfixturevalue('vllm_url')}")
    yield engine
    engine.close()


def kind(engine: ScoringEngine) -> str:
    return engine.spec.partition(":")[0]


def test_malformed_batches_are_refused_alike(engine):
    with pytest.raises(TypeError, match="wrap a single prompt in a list"):
        engine.score("Text: hi\nLabel:", [[" a"]])
    with pytest.raises(ValueError, match="2 prompts but 1 candidate lists"):
        engine.score(["a", "b"], [[" a"]])
    with pytest.raises(ValueError, match="prompt 0: candidates must be a non-empty list"):
        engine.score(["a"], [[]])
    with pytest.raises(ValueError, match="prompt 0: duplicate candidates"):
        engine.score(["a"], [[" x", " x"]])
    with pytest.raises(EngineError, match="encodes to no tokens"):
        engine.score(["a"], [[" x", ""]])


def test_scores_are_log_probabilities_of_whole_candidates(engine):
    renderer = PromptRenderer(BANKING)
    candidates = renderer.candidates(BANKING.label_names)
    prompts_before = engine.stats.prompts
    scores = engine.score([renderer.render("my card has not arrived yet").text, "The capital of France is"],
                          [candidates, [" Paris", " a city", " Paris, the capital"]])
    assert_log_probabilities(scores[0], candidates)
    assert scores[1][" Paris"] > scores[1][" a city"]
    assert scores[1][" Paris, the capital"] < scores[1][" Paris"]  # a longer continuation is a narrower event
    assert engine.stats.prompts == prompts_before + 2


def test_after_a_reset_the_same_prompts_score_the_same(engine):
    renderer = PromptRenderer(BANKING)
    candidates = renderer.candidates(BANKING.label_names)
    prompts = [renderer.render(text).text for text in ("my pin is blocked", "card payment declined")]
    engine.reset()
    first = engine.score(prompts, [candidates] * 2)
    engine.score(["Text: something else entirely\nLabel:"], [candidates])  # the cache moves on
    engine.reset()
    again = engine.score(prompts, [candidates] * 2)
    for a, b in zip(first, again, strict=True):
        assert a == pytest.approx(b, abs=REPEAT_TOLERANCE[kind(engine)], rel=0)


def test_a_spent_deadline_times_out_and_the_engine_answers_after(engine):
    renderer = PromptRenderer(BANKING)
    candidates = renderer.candidates(BANKING.label_names)
    with pytest.raises(EngineTimeout):
        engine.score([renderer.render("a text never seen before " * 20).text], [candidates], timeout=0)
    assert_log_probabilities(engine.score([renderer.render("lost card").text], [candidates])[0], candidates)


def test_an_engine_is_shared_not_copied(engine):
    assert isinstance(engine, ScoringEngine) and copy.deepcopy(engine) is engine
