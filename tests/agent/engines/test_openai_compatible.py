"""The OpenAI-compatible engine against a real OpenAI-compatible server: llama-cpp-python's own server on the packaged
Gemma 3 270M GGUF, the model the in-process llama.cpp engine scores exactly, so the approximation is measured against
the exact scores of the same model."""

import math
import subprocess
import sys
import time
import urllib.request

import pytest

from labelcascade.agent.engines import EngineError, EngineTimeout, load_engine
from labelcascade.agent.engines.llamacpp import default_model_path
from labelcascade.agent.engines.openai_compatible import OpenAICompatibleEngine
from labelcascade.prompts import PromptRenderer
from labelcascade.records import Example
from labelcascade.task import Task

from ...conftest import few_shot, held_out
from .conftest import free_port

# How far the server's log-probability of a token may lie from the in-process engine's for the same token after the
# same prompt: both are llama.cpp on the same file, but batched differently (the server evaluates what its prompt
# cache lacks, the engine the trie beside its own cache), and llama.cpp's CPU kernels round differently for different
# batch shapes. Measured in these tests well inside it.
SAME_TOKEN_TOLERANCE = 0.25


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    """llama-cpp-python's OpenAI-compatible server on 127.0.0.1, started for this module and stopped after it."""
    port = free_port()
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(default_model_path()), "--host", "127.0.0.1",
               "--port", str(port), "--n_ctx", "2048", "--n_threads", "2", "--n_threads_batch", "2"]
    with log.open("w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        ready_by = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                pytest.fail(f"llama_cpp.server exited ({process.returncode}); the dev extra has its packages:\n"
                            f"{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "/models", timeout=2):
                    break
            except OSError:
                if time.monotonic() > ready_by:
                    pytest.fail(f"llama_cpp.server did not answer in 60 s:\n{log.read_text()[-3000:]}")
                time.sleep(0.25)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def exact(gemma):
    """The exact in-process engine on the same file (the session's). The server is idle while it scores: run beside
    other busy processes, llama.cpp's spinning threads slow each other down many times over."""
    return gemma


@pytest.fixture(scope="module")
def engine(server_url):
    engine = load_engine(f"openai:{server_url}")
    yield engine
    engine.close()


def rendered(dataset: str, size: int, *, shots: bool) -> tuple[list[str], list[str]]:
    """`size` held-out texts of a public dataset as prompts, with one example per label or none, and the candidates."""
    texts, labels = few_shot(dataset, 1)
    task = Task.from_labels(sorted(set(labels)), name=dataset)
    renderer = PromptRenderer(task)
    examples = [Example(i, text, (label,)) for i, (text, label) in enumerate(zip(texts, labels, strict=True))]
    return [renderer.render(text, examples if shots else []).text for text in held_out(dataset, size)[0]], \
        renderer.candidates(task.label_names)


@pytest.mark.slow
@pytest.mark.parametrize(("dataset", "shots"), [("sst2", True), ("ag_news", False)])
def test_answers_agree_with_the_exact_engine_on_the_same_model(engine, exact, dataset, shots):
    """Labels whose first tokens differ (sentiment, news topics) are scored by their first token alone, from one
    request per prompt (two where the server shows a piece two labels share). A label whose first token the server
    shows scores the exact engine's log-probability of that token (to kernel rounding); one it does not show scores
    the lowest shown, above its exact log-probability. Both are upper bounds of the exact score of the whole
    candidate, and the answers are the exact engine's. Without examples the news labels " Sci/Tech" and " Sports"
    are unlikely enough to be left out of the top K."""
    prompts, candidates = rendered(dataset, 4, shots=shots)
    first_tokens = [exact._token_text(exact.tokenize(candidate, bos=False)[0]) for candidate in candidates]
    assert len(set(first_tokens)) == len(candidates)  # what this test is about
    before = vars(engine.stats).copy()
    approximate = engine.score(prompts, [candidates] * len(prompts))
    reference = exact.score(prompts, [candidates + first_tokens] * len(prompts))
    # A token likelier than 1/K is always among the top K shown: at most K - 1 others can be likelier.
    surely_shown = math.log(1 / engine.top_logprobs) + SAME_TOKEN_TOLERANCE
    agree = 0
    for i, (approx, scores) in enumerate(zip(approximate, reference, strict=True)):
        agree += max(approx, key=approx.get) == max(candidates, key=scores.get)
        for candidate, first in zip(candidates, first_tokens, strict=True):
            seen = f"prompt {i}, {candidate!r}: server {approx}, exact {scores}"
            assert approx[candidate] >= scores[first] - SAME_TOKEN_TOLERANCE >= scores[candidate] - SAME_TOKEN_TOLERANCE, seen
            if scores[first] > surely_shown:
                assert approx[candidate] == pytest.approx(scores[first], abs=SAME_TOKEN_TOLERANCE), seen
    assert agree >= len(prompts) - 1
    delta = {key: value - before[key] for key, value in vars(engine.stats).items()}
    # One request each, and one more where the server showed a piece that two labels share inside a word (" S" of
    # " Sci/Tech" and " Sports": shown after some prompt orders, see the module's docstring) to tell them apart.
    assert delta["prompts"] == len(prompts) <= delta["candidate_tokens"] <= 2 * len(prompts)
    assert delta["prompt_tokens"] > 0  # this server reports no cached tokens: every request's tokens are computed
    if delta["candidate_tokens"] == len(prompts):
        assert delta["computed_tokens"] == delta["prompt_tokens"]
    else:  # the follow-up requests' tokens are computed, and counted as no prompt's
        assert delta["computed_tokens"] > delta["prompt_tokens"]


@pytest.mark.slow
def test_a_candidate_that_follows_a_piece_inside_a_word_keeps_the_bound(server_url, exact):
    """Right after an sst2 prompt (which shares 17 tokens with it), a news prompt's top K shows " S" and not " Sci":
    this server reuses the shared prefix, and the rounding of the shorter evaluation lifts " S" (a near tie with the
    20th token) into the top K. " Sci/Tech" and " Sports" follow " S", then miss at the second request; they still
    score at least the first request's lowest shown, above their exact scores. (Found as a rare failure of the test
    above: its four requests reach the server in any order.)"""
    sst2, sst2_candidates = rendered("sst2", 4, shots=True)
    news, candidates = rendered("ag_news", 4, shots=False)
    engine = OpenAICompatibleEngine(server_url, concurrency=1)
    try:
        engine.score(sst2[2:3], [sst2_candidates])
        top, floor = engine._next_token_logprobs(news[3], None, first=True)
        assert " S" in top and " Sci" not in top and " Sports" not in top  # what this test is about
        engine.score(sst2[2:3], [sst2_candidates])
        scores = engine.score(news[3:4], [candidates])[0]
    finally:
        engine.close()
    reference = exact.score(news[3:4], [candidates])[0]
    for candidate in (" Sci/Tech\n\n", " Sports\n\n"):
        assert scores[candidate] == pytest.approx(floor, abs=SAME_TOKEN_TOLERANCE)
        assert scores[candidate] >= reference[candidate]
    assert max(scores, key=scores.get) == max(reference, key=reference.get)


@pytest.mark.slow
def test_candidates_sharing_their_start_are_told_apart_further_down(engine, server_url, exact):
    """" Paris" and " Paris, the capital" share their first token: the longer one goes on to a second request and
    scores lower, as a narrower event. With a depth of one request they tie. A candidate whose first piece is not in
    the top K ("zebra") gets the lowest log-probability shown, still an upper bound of its exact score."""
    prompt = "The capital of France is"
    candidates = [" Paris", " Paris, the capital", " zebra crossing"]
    before = engine.stats.candidate_tokens
    scores = engine.score([prompt], [candidates])[0]
    reference = exact.score([prompt], [candidates])[0]
    assert engine.stats.candidate_tokens - before == 2  # the prompt, then the prompt + " Paris"
    assert scores[" Paris, the capital"] < scores[" Paris"]
    assert scores[" Paris"] == pytest.approx(reference[" Paris"], abs=SAME_TOKEN_TOLERANCE)
    assert scores[" zebra crossing"] < scores[" Paris"]
    assert all(scores[c] >= reference[c] - SAME_TOKEN_TOLERANCE for c in candidates)
    shallow = OpenAICompatibleEngine(server_url, max_depth=1)
    try:
        tied = shallow.score([prompt], [candidates])[0]
        assert tied[" Paris"] == tied[" Paris, the capital"] == pytest.approx(scores[" Paris"], abs=1e-6)
    finally:
        shallow.close()


@pytest.mark.slow
def test_the_spec_finds_the_only_model_and_the_api_key(server_url, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-the-environment")
    engine = load_engine(f"openai:{server_url}")
    try:
        assert engine.model == str(default_model_path())  # llama-cpp-python names its model by its path
        assert engine.spec == f"openai:{server_url}#{engine.model}"
        assert engine._client.api_key == "sk-from-the-environment"
        assert engine.chat_template is None  # the `auto` template then prompts as a base model
        with pytest.raises(EngineError, match="encodes to no tokens"):
            engine.score(["a"], [[" x", ""]])
        with pytest.raises(NotImplementedError):
            engine.tokenize("a", bos=False)
    finally:
        engine.close()
    monkeypatch.delenv("OPENAI_API_KEY")
    named = load_engine(f"openai:{server_url}#any-name")  # a named model is taken as named: servers alias models
    try:
        assert named.model == "any-name" and named._client.api_key == "EMPTY"
    finally:
        named.close()


def test_a_server_that_is_not_there_is_an_engine_error_at_once():
    url = f"http://127.0.0.1:{free_port()}/v1"
    began = time.monotonic()
    with pytest.raises(EngineError, match=f"{url}: OpenAI-compatible server request failed"):
        load_engine(f"openai:{url}", timeout=5)
    named = load_engine(f"openai:{url}#model", timeout=5)  # nothing asked of the server until it scores
    try:
        with pytest.raises(EngineError, match="request failed"):
            named.score(["Text: hi\nLabel:"], [[" a", " b"]], timeout=5)
    finally:
        named.close()
    assert time.monotonic() - began < 3


@pytest.mark.slow
def test_a_deadline_shorter_than_the_work_times_out_by_it(engine):
    """The deadline bounds the whole batch: requests already sent are abandoned when it passes, those not yet sent are
    not sent. (Last in the module: the server still finishes what it was given.)"""
    prompts = [f"Text: day {i} of waiting in the rain for a bus that never came\nLabel:" for i in range(4)]
    began = time.monotonic()
    with pytest.raises(EngineTimeout):
        engine.score(prompts, [[" negative", " positive"]] * 4, timeout=0.3)
    assert time.monotonic() - began < 1.5
    with pytest.raises(EngineTimeout):
        engine.score(prompts, [[" negative", " positive"]] * 4, timeout=0)
    scores = engine.score(prompts[:1], [[" negative", " positive"]], timeout=60)[0]  # and it answers after
    assert all(-50 < value <= 0 for value in scores.values())
