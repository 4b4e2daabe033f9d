"""A vLLM server behind its OpenAI-compatible API, reached with the `openai` client.

Scoring is exact and reads vLLM's prefix cache. A prompt's candidates form a trie of token ids; each trie node
(the prompt, then the prompt plus each candidate prefix) is one completions request for a single token, asking
through `logprob_token_ids` for the log-probability of exactly the tokens that follow that node. A candidate's score
is the sum along its path. The prompt's own request goes first, so every later one finds the prompt in the cache
and computes only its unfinished cache block and its path. (Asking `prompt_logprobs` of `prompt + candidate` would
be one request per candidate, but vLLM reads no cache for such requests and evaluates every prompt in full.)
Token ids are sent rather than text so the boundary between prompt and candidate is exactly where the candidate's
own tokens begin. Requests run concurrently. `stats.computed_tokens` is what the server reports it did not find in
its cache (`--enable-prompt-tokens-details`; without it, every prompt token counts as computed).

Failing in time: a scoring call with a deadline (the cascade always gives one) ends by it, whatever the server does.
The `openai` client would give every request its full timeout and its retries the same again, so a hung server held
one batch for minutes; under a deadline every request gets only the time left, and a failed one is not retried
except for a connection error, at once (a keep-alive connection the server had just closed). A server that is down
is the cascade's engine slot's business: it answers from the fallback and tries the server again later. Without a
deadline the client's own timeout and retries apply.

Cost to know: a trie node costs one request; banking77's 77 labels make 349 nodes per prompt, each recomputing up
to a cache block (32 tokens in tools/vllm_server.sh) of the prompt's tail. Cheap on a GPU; on a CPU with dozens of
labels, prefer the llama.cpp engine, which scores the whole trie in one batched call.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from labelcascade.agent.engines.base import (
    EngineError,
    OpenAIServerMixin,
    ScoringEngine,
    candidate_trie,
    path_logprob,
    version_at_least,
)

# `guided_*` request fields were removed in vLLM 0.12 (an older or newer server given the wrong ones silently
# generates unconstrained text). The fields scoring needs, logprob_token_ids on completions, came later still: a server
# that ignores them is refused at the first scoring call, since its version number alone does not say.
MIN_VLLM_VERSION = (0, 12)
MAX_TOKEN_IDS = 128  # vLLM's cap on logprob_token_ids per request (MAX_LOGPROB_TOKEN_IDS)


class VLLMServerEngine(OpenAIServerMixin, ScoringEngine):
    """Scores candidates on a running vLLM OpenAI-compatible server."""

    name = "vLLM"
    scheme = "vllm"

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        *,
        api_key: str = "EMPTY",
        timeout: float = 60.0,
        max_retries: int = 2,
        concurrency: int = 8,
    ):
        try:
            import openai
        except ImportError as error:
            raise EngineError("the vLLM engine needs the openai client: pip install 'labelcascade[vllm]'") from error
        self._connect(openai, base_url, api_key=api_key, timeout=timeout, max_retries=max_retries)
        self._root = base_url.rstrip("/").removesuffix("/v1")  # /version and /tokenize live beside /v1
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="vllm-score")
        # The checks below share one `timeout`: a hung server fails the load in that time, not in minutes.
        ready_by = time.monotonic() + timeout
        self.version = self._check_version(ready_by)
        self.model = model or self._only_model(ready_by)
        super().__init__(f"vllm:{base_url}#{self.model}")
        self._stats_lock = threading.Lock()  # requests for different prompts finish on different threads
        self.check_bos(self.model, ready_by)

    # --- the server -----------------------------------------------------------------------------------------

    def _check_version(self, deadline: float) -> str:
        try:
            version = self._call(
                lambda client, options: client.get(self._root + "/version", cast_to=object, options=options), deadline
            )["version"]
        except Exception as error:  # noqa: BLE001 - any failure here means "not a reachable vLLM server"
            raise EngineError(f"no vLLM server answers at {self._root} ({error})") from error
        if not version_at_least(version, MIN_VLLM_VERSION):
            raise EngineError(
                f"vLLM {version} at {self._root} is older than "
                f"{'.'.join(map(str, MIN_VLLM_VERSION))}: its request fields differ and constraints would be "
                "silently ignored; upgrade the server"
            )
        return version

    def tokenize(self, text: str, *, bos: bool, deadline: float | None = None) -> list[int]:
        """The server's own tokenization (its /tokenize route), within `deadline`."""
        body = {"model": getattr(self, "model", None), "prompt": text, "add_special_tokens": bos}

        def send(client, options):
            return client.post(self._root + "/tokenize", body=body, cast_to=object, options=options)

        return self._call(send, deadline)["tokens"]

    # --- scoring --------------------------------------------------------------------------------------------

    def _score(
        self, prompts: Sequence[str], candidates: Sequence[Sequence[str]], deadline: float | None
    ) -> list[dict[str, float]]:
        # Two waves, so that every request after a prompt's first reads the prompt from vLLM's prefix cache: first
        # each prompt's root (the prompt alone, computed and cached), then every other trie node of every prompt.
        roots = [self._pool.submit(self._score_root, p, c, deadline) for p, c in zip(prompts, candidates, strict=True)]
        tries = [future.result() for future in roots]
        nodes = [
            self._pool.submit(self._score_node, trie, path, deadline) for trie in tries for path in trie.paths[1:]
        ]
        for future in nodes:
            future.result()
        return [trie.scores() for trie in tries]

    def _score_root(self, prompt: str, options: Sequence[str], deadline: float | None) -> CandidateTrie:
        prompt_ids = self.tokenize(prompt, bos=True, deadline=deadline)
        trie = CandidateTrie(prompt_ids, {option: list(self.candidate_ids(option, deadline)) for option in options})
        if trie.paths:  # the root, the prompt alone (none only if every candidate is empty)
            self._score_node(trie, trie.paths[0], deadline)
        with self._stats_lock:
            self.stats.prompts += 1
            self.stats.prompt_tokens += len(prompt_ids)
            self.stats.candidate_tokens += sum(map(len, trie.following.values()))
        return trie

    def _score_node(self, trie: CandidateTrie, path: tuple[int, ...], deadline: float | None) -> None:
        """The log-probability of each token that follows `path` in the trie, read from ONE generated token's
        `logprob_token_ids` (asking no prompt log-probabilities, so vLLM reads its prefix cache)."""
        following = trie.following[path]
        for start in range(0, len(following), MAX_TOKEN_IDS):
            token_ids = following[start : start + MAX_TOKEN_IDS]
            response = self._call(
                lambda client, request, token_ids=token_ids: client.completions.create(
                    model=self.model,
                    prompt=trie.prompt_ids + list(path),
                    max_tokens=1,
                    temperature=0.0,
                    logprobs=1,
                    extra_body={"logprob_token_ids": token_ids, "return_tokens_as_token_ids": True},
                    **request,
                ),
                deadline,
            )
            returned = response.choices[0].logprobs.top_logprobs[0]
            for token in token_ids:
                value = returned.get(f"token_id:{token}")
                if value is None:
                    raise EngineError(
                        f"vLLM {self.version} returned no log-probability for token {token}: the server ignores the "
                        "completions fields logprob_token_ids and return_tokens_as_token_ids (added in 2026); "
                        "upgrade the server"
                    )
                trie.logprobs.setdefault(path, {})[token] = float(value)
            # Without --enable-prompt-tokens-details the server reports no cache hits: every prompt token counts.
            details = response.usage.prompt_tokens_details
            cached = (details.cached_tokens or 0) if details is not None else 0
            with self._stats_lock:
                self.stats.computed_tokens += response.usage.prompt_tokens - cached

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()


class CandidateTrie:
    """One prompt and its candidates' token trie (`candidate_trie`): each path is asked once, in its own request, for
    the log-probabilities of the tokens that follow it, and a candidate's score is the sum along its path."""

    def __init__(self, prompt_ids: list[int], candidates: dict[str, list[int]]):
        self.prompt_ids = prompt_ids
        self.candidates = candidates
        self.following = {path: sorted(tokens) for path, tokens in candidate_trie(candidates.values()).items()}
        self.paths = sorted(self.following, key=len)  # the root first
        self.logprobs: dict[tuple[int, ...], dict[int, float]] = {}  # path -> token -> log P(token | prompt + path)

    def scores(self) -> dict[str, float]:
        return {option: path_logprob(self.logprobs, ids) for option, ids in self.candidates.items()}
