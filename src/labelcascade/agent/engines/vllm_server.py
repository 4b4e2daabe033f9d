"""A vLLM server behind its OpenAI-compatible API, reached with the `openai` client.

Scoring is exact: for each prompt, one completions request carries every candidate as its own token-id prompt
(`prompt + candidate`), with `echo` and `logprobs`, so vLLM returns the log-probability of every prompt token,
and the candidate's are summed. Token ids are used rather than text so the boundary between prompt and candidate
is exactly where the candidate's own tokens begin. Requests for different prompts run concurrently.

Failing in time: a scoring call with a deadline (the cascade always gives one) ends by it, whatever the server does.
The `openai` client would give every request its full timeout and its retries the same again, so a hung server held
one batch for minutes; under a deadline every request gets only the time left, and a failed one is not retried
except for a connection error, at once (a keep-alive connection the server had just closed). A server that is down
is the cascade's engine slot's business: it answers from the fallback and tries the server again later. Without a
deadline the client's own timeout and retries apply.

Cost to know: vLLM does not read its prefix cache for requests that ask for prompt log-probabilities, so every
candidate's prompt is evaluated in full. That is cheap on a GPU and for few labels; on a CPU with dozens of
labels, prefer the llama.cpp engine.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from labelcascade.agent.engines.base import EngineError, EngineStats, EngineTimeout, check_batch

# `guided_*` request fields were removed in vLLM 0.12 (an older or newer server given the wrong ones silently
# generates unconstrained text), and the token-id prompts with echo used here are checked against 0.12 and later.
MIN_VLLM_VERSION = (0, 12)


class VLLMServerEngine:
    """Scores candidates on a running vLLM OpenAI-compatible server."""

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
        self._openai = openai
        self._client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=max_retries)
        self._bounded = self._client.with_options(max_retries=0)  # for requests under a deadline: see _call
        self._max_retries = max_retries
        self._candidates: dict[str, list[int]] = {}
        self._root = base_url.rstrip("/").removesuffix("/v1")  # /version and /tokenize live beside /v1
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="vllm-score")
        # The checks below share one `timeout`: a hung server fails the load in that time, not in minutes.
        ready_by = time.monotonic() + timeout
        self.version = self._check_version(ready_by)
        self.model = model or self._only_model(ready_by)
        self.spec = f"vllm:{base_url}#{self.model}"
        self.stats = EngineStats()
        self._stats_lock = threading.Lock()  # requests for different prompts finish on different threads
        self._check_bos(ready_by)

    # --- the server -----------------------------------------------------------------------------------------

    def _check_version(self, deadline: float) -> str:
        try:
            version = self._call(
                lambda client, options: client.get(self._root + "/version", cast_to=object, options=options), deadline
            )["version"]
        except Exception as error:  # noqa: BLE001 - any failure here means "not a reachable vLLM server"
            raise EngineError(f"no vLLM server answers at {self._root} ({error})") from error
        numbers = tuple(int(part) for part in version.split(".")[:2] if part.isdigit())
        if numbers < MIN_VLLM_VERSION:
            raise EngineError(
                f"vLLM {version} at {self._root} is older than "
                f"{'.'.join(map(str, MIN_VLLM_VERSION))}: its request fields differ and constraints would be "
                "silently ignored; upgrade the server"
            )
        return version

    def _only_model(self, deadline: float) -> str:
        models = [model.id for model in self._call(lambda client, options: client.models.list(**options), deadline).data]
        if len(models) != 1:
            raise EngineError(f"the server serves {models}; name one in the spec: vllm:URL#MODEL")
        return models[0]

    def _check_bos(self, deadline: float) -> None:
        """Refuse a Gemma whose tokenizer adds no <bos>: it answers garbage (tools/convert_gguf_to_hf.py fixes it)."""
        with_special = self._tokenize("Hello", special=True, deadline=deadline)
        plain = self._tokenize("Hello", special=False, deadline=deadline)
        if "gemma" in self.model.lower() and with_special == plain:
            raise EngineError(
                f"the server's tokenizer for {self.model} does not prepend <bos>, and Gemma produces garbage without "
                "it; serve a checkpoint whose tokenizer adds it (tools/convert_gguf_to_hf.py does)"
            )

    def _candidate_ids(self, text: str, deadline: float | None) -> list[int]:
        """A candidate's token ids. Candidates repeat for every text, so each is tokenized once (the few thousand
        last seen are kept)."""
        ids = self._candidates.get(text)
        if ids is None:
            if len(self._candidates) >= 4096:
                self._candidates.clear()
            ids = self._candidates[text] = self._tokenize(text, special=False, deadline=deadline)
        return ids

    def _tokenize(self, text: str, *, special: bool, deadline: float | None = None) -> list[int]:
        body = {"model": getattr(self, "model", None), "prompt": text, "add_special_tokens": special}

        def send(client, options):
            return client.post(self._root + "/tokenize", body=body, cast_to=object, options=options)

        return self._call(send, deadline)["tokens"]

    def _call(self, send, deadline: float | None = None):
        """`send(client, options)` once, within `deadline` if given (see the module docstring), with the client's
        errors turned into EngineTimeout and EngineError. `options` holds the request's timeout, if it has one."""
        attempt = 0
        while True:
            if deadline is None:
                client, options = self._client, {}
            else:
                client, options = self._bounded, {"timeout": deadline - time.monotonic()}
                if options["timeout"] <= 0:
                    raise EngineTimeout("vLLM scoring ran out of time")
            try:
                return send(client, options)
            except self._openai.APITimeoutError as error:
                raise EngineTimeout(f"vLLM did not answer in time: {error}") from error
            except self._openai.APIConnectionError as error:
                if deadline is None or attempt >= self._max_retries:
                    raise EngineError(f"vLLM request failed: {error}") from error
                attempt += 1
            except self._openai.OpenAIError as error:
                raise EngineError(f"vLLM request failed: {error}") from error

    # --- scoring --------------------------------------------------------------------------------------------

    def score(
        self, prompts: Sequence[str], candidates: Sequence[Sequence[str]], *, timeout: float | None = None
    ) -> list[dict[str, float]]:
        check_batch(prompts, candidates)
        deadline = None if timeout is None else time.monotonic() + timeout
        futures = [self._pool.submit(self._score_one, p, c, deadline) for p, c in zip(prompts, candidates, strict=True)]
        return [future.result() for future in futures]

    def _score_one(self, prompt: str, options: Sequence[str], deadline: float | None) -> dict[str, float]:
        prompt_ids = self._tokenize(prompt, special=True, deadline=deadline)
        encoded = [self._candidate_ids(option, deadline) for option in options]
        response = self._call(
            lambda client, request: client.completions.create(
                model=self.model,
                prompt=[prompt_ids + ids for ids in encoded],
                max_tokens=1,
                temperature=0.0,
                echo=True,
                logprobs=0,
                **request,
            ),
            deadline,
        )
        start = len(prompt_ids)
        scores = {}
        for choice in sorted(response.choices, key=lambda c: c.index):
            option, ids = options[choice.index], encoded[choice.index]
            logprobs = choice.logprobs.token_logprobs[start : start + len(ids)]
            if len(logprobs) != len(ids) or any(value is None for value in logprobs):
                raise EngineError(f"vLLM returned no prompt log-probabilities for candidate {option!r}")
            scores[option] = float(sum(logprobs))
        with self._stats_lock:
            self.stats.prompts += 1
            self.stats.prompt_tokens += len(prompt_ids)
            self.stats.candidate_tokens += sum(len(ids) for ids in encoded)
            self.stats.computed_tokens += sum(len(prompt_ids) + len(ids) for ids in encoded)  # no prefix cache reads
        return {option: scores[option] for option in options}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()
