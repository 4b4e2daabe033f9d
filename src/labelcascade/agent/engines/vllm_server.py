"""A vLLM server behind its OpenAI-compatible API, reached with the `openai` client.

Scoring is exact: for each prompt, one completions request carries every candidate as its own token-id prompt
(`prompt + candidate`), with `echo` and `logprobs`, so vLLM returns the log-probability of every prompt token,
and the candidate's are summed. Token ids are used rather than text so the boundary between prompt and candidate
is exactly where the candidate's own tokens begin. Requests for different prompts run concurrently; the `openai`
client retries only what is retryable (connection errors, 408/409/429/5xx) and times out.

Cost to know: vLLM does not read its prefix cache for requests that ask for prompt log-probabilities, so every
candidate's prompt is evaluated in full. That is cheap on a GPU and for few labels; on a CPU with dozens of
labels, prefer the llama.cpp engine.
"""

from __future__ import annotations

import functools
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
        self._root = base_url.rstrip("/").removesuffix("/v1")  # /version and /tokenize live beside /v1
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="vllm-score")
        self.version = self._check_version()
        self.model = model or self._only_model()
        self.spec = f"vllm:{base_url}#{self.model}"
        self.stats = EngineStats()
        self._stats_lock = threading.Lock()  # requests for different prompts finish on different threads
        self._check_bos()

    # --- the server -----------------------------------------------------------------------------------------

    def _check_version(self) -> str:
        try:
            version = self._client.get(self._root + "/version", cast_to=object)["version"]
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

    def _only_model(self) -> str:
        models = [model.id for model in self._call(self._client.models.list).data]
        if len(models) != 1:
            raise EngineError(f"the server serves {models}; name one in the spec: vllm:URL#MODEL")
        return models[0]

    def _check_bos(self) -> None:
        """Refuse a Gemma whose tokenizer adds no <bos>: it answers garbage (tools/convert_gguf_to_hf.py fixes it)."""
        with_special, plain = self._tokenize("Hello", special=True), self._tokenize("Hello", special=False)
        if "gemma" in self.model.lower() and with_special == plain:
            raise EngineError(
                f"the server's tokenizer for {self.model} does not prepend <bos>, and Gemma produces garbage without "
                "it; serve a checkpoint whose tokenizer adds it (tools/convert_gguf_to_hf.py does)"
            )

    @functools.lru_cache(maxsize=4096)  # candidates repeat for every text: tokenize each once
    def _tokenize_cached(self, text: str, special: bool) -> tuple[int, ...]:
        return tuple(self._tokenize(text, special=special))

    def _tokenize(self, text: str, *, special: bool) -> list[int]:
        body = {"model": getattr(self, "model", None), "prompt": text, "add_special_tokens": special}
        return self._call(self._client.post, self._root + "/tokenize", body=body, cast_to=object)["tokens"]

    def _call(self, method, *args, **kwargs):
        try:
            return method(*args, **kwargs)
        except self._openai.APITimeoutError as error:
            raise EngineTimeout(f"vLLM did not answer in time: {error}") from error
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
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise EngineTimeout("vLLM scoring ran out of time before the request was sent")
        prompt_ids = self._tokenize(prompt, special=True)
        encoded = [list(self._tokenize_cached(option, False)) for option in options]
        response = self._call(
            self._client.completions.create,
            model=self.model,
            prompt=[prompt_ids + ids for ids in encoded],
            max_tokens=1,
            temperature=0.0,
            echo=True,
            logprobs=0,
            **({} if remaining is None else {"timeout": remaining}),
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
