"""The engine protocol: score candidate continuations of prompts, batched; nothing else.

Engines never generate free text that must be parsed: for each prompt they return the log-probability of each
candidate continuation (the whole continuation, every token of it). Every backend (llama.cpp, a vLLM server, vLLM
in-process, transformers) is one adapter on `ScoringEngine`, which does what they all need the same way (batch
checks, the deadline, one call at a time, counts, the candidates' token ids, refusing a broken Gemma tokenizer);
an adapter implements only tokenizing and its own scoring. The engines that reach a server through the `openai`
client share `OpenAIServerMixin` as well (requests bounded by the scoring call's deadline).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


class EngineError(RuntimeError):
    """The engine could not answer (down, broken, refused); the cascade answers from the fallback instead."""


class EngineTimeout(EngineError):
    """The engine did not answer in time."""


@dataclass
class EngineStats:
    """Counts since the engine started, to see what prefix caching and batching save."""

    prompts: int = 0
    prompt_tokens: int = 0  # tokens in the prompts scored
    computed_tokens: int = 0  # tokens the model actually evaluated (prompt suffixes not cached + candidate tokens)
    candidate_tokens: int = 0  # tokens in the candidates scored (each trie node counted once)
    decode_calls: int = 0  # forward passes (llama_decode calls) of an in-process engine: each has a fixed cost


@runtime_checkable
class Engine(Protocol):
    """Scores candidate continuations; see the module docstring."""

    spec: str
    stats: EngineStats

    def score(
        self, prompts: Sequence[str], candidates: Sequence[Sequence[str]], *, timeout: float | None = None
    ) -> list[dict[str, float]]:
        """For each prompt, the total log-probability of each of its candidates as the continuation.

        `candidates[i]` are the continuations for `prompts[i]`. Raises EngineError (EngineTimeout past `timeout`
        seconds for the whole batch) when it cannot answer.
        """
        ...

    def close(self) -> None:
        """Release the model or the connection."""
        ...


@dataclass(frozen=True)
class ChatTemplate:
    """A model's own chat template (Jinja text) and the special tokens it refers to; the prompts layer reads the
    turns out of it (`prompts.chat_turns`)."""

    text: str
    bos_token: str = ""
    eos_token: str = ""


class ScoringEngine:
    """The shared half of every engine; an adapter implements `tokenize` and `_score` (and `_reset`, `close`)."""

    name = "engine"  # in messages: "<name> did not finish scoring in time"
    CANDIDATE_CACHE = 4096  # candidates repeat for every text: the token ids of this many are kept
    chat_template: ChatTemplate | None = None  # set by an adapter whose model carries one

    def __init__(self, spec: str):
        self.spec = spec
        self.stats = EngineStats()
        self._lock = threading.Lock()
        self._candidates: dict[str, tuple[int, ...]] = {}

    def score(
        self, prompts: Sequence[str], candidates: Sequence[Sequence[str]], *, timeout: float | None = None
    ) -> list[dict[str, float]]:
        """For each prompt, the total log-probability of each of its candidates (see `Engine.score`). Calls take
        turns: an engine holds one model state (a KV cache, a connection pool) that one scoring call uses at a time."""
        check_batch(prompts, candidates)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            return self._score(prompts, candidates, deadline)

    def _score(
        self, prompts: Sequence[str], candidates: Sequence[Sequence[str]], deadline: float | None
    ) -> list[dict[str, float]]:
        raise NotImplementedError

    def tokenize(self, text: str, *, bos: bool, deadline: float | None = None) -> list[int]:
        """Token ids of `text`; a prompt with the model's special start (<bos>), a candidate without."""
        raise NotImplementedError

    def candidate_ids(self, option: str, deadline: float | None = None) -> tuple[int, ...]:
        """A candidate's token ids, tokenized once per engine; EngineError for one that encodes to nothing."""
        ids = self._candidates.get(option)
        if ids is None:
            ids = tuple(self.tokenize(option, bos=False, deadline=deadline))
            if not ids:
                raise EngineError(f"the candidate {option!r} encodes to no tokens")
            if len(self._candidates) >= self.CANDIDATE_CACHE:
                self._candidates.clear()
            self._candidates[option] = ids
        return ids

    def check_deadline(self, deadline: float | None) -> None:
        """EngineTimeout once `deadline` (time.monotonic) has passed; adapters call it between steps."""
        if deadline is not None and time.monotonic() > deadline:
            raise EngineTimeout(f"{self.name} did not finish scoring in time")

    def check_bos(self, model_type: str, deadline: float | None = None) -> None:
        """Refuse a Gemma whose tokenizer adds no <bos>: it answers garbage (tools/convert_gguf_to_hf.py fixes it)."""
        if "gemma" in str(model_type).lower() and self.tokenize("Hello", bos=True, deadline=deadline) == self.tokenize(
            "Hello", bos=False, deadline=deadline
        ):
            raise EngineError(
                f"the tokenizer of {self.spec} does not prepend <bos>, and Gemma produces garbage without it; use a "
                "checkpoint whose tokenizer adds it (tools/convert_gguf_to_hf.py does)"
            )

    def reset(self) -> None:
        """Forget any cached prompt prefix, so that the next scores do not depend on what was scored before (the
        estimator's predict calls it). Servers have nothing to forget."""
        with self._lock:
            self._reset()

    def _reset(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __deepcopy__(self, memo) -> ScoringEngine:
        """A loaded model is shared, not copied: scikit-learn's `clone` deep-copies an estimator's parameters."""
        return self


class OpenAIServerMixin:
    """The half of a server engine that talks to an OpenAI-compatible API through the `openai` client (the vLLM and
    the generic OpenAI-compatible engines): requests that end by a scoring call's deadline, and the one model a server
    serves. The client's own timeout and retries would give every request its full timeout and its retries the same
    again, so a hung server held one batch for minutes; under a deadline a request gets only the time left and is
    retried only after a connection error (a keep-alive connection the server had just closed), at once. Without a
    deadline the client's own timeout and retries apply."""

    name = "server"  # in messages, as ScoringEngine's
    scheme = "openai"  # the engine spec's scheme, in the message that asks for a model name

    def _connect(self, openai, base_url: str, *, api_key: str, timeout: float, max_retries: int) -> None:
        """The client (`openai` is the imported module), and a copy of it without retries for deadline-bound calls."""
        self._openai = openai
        self._client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=max_retries)
        self._bounded = self._client.with_options(max_retries=0)
        self._max_retries = max_retries

    def _call(self, send, deadline: float | None = None):
        """`send(client, options)` once, within `deadline` if given, with the client's errors turned into
        EngineTimeout and EngineError. `options` holds the request's timeout, if it has one."""
        attempt = 0
        while True:
            if deadline is None:
                client, options = self._client, {}
            else:
                client, options = self._bounded, {"timeout": deadline - time.monotonic()}
                if options["timeout"] <= 0:
                    raise EngineTimeout(f"{self.name} scoring ran out of time")
            try:
                return send(client, options)
            except self._openai.APITimeoutError as error:
                raise EngineTimeout(f"{self.name} did not answer in time: {error}") from error
            except self._openai.APIConnectionError as error:
                if deadline is None or attempt >= self._max_retries:
                    raise EngineError(f"{self.name} request failed: {error}") from error
                attempt += 1
            except self._openai.OpenAIError as error:
                raise EngineError(f"{self.name} request failed: {error}") from error

    def _only_model(self, deadline: float) -> str:
        models = [model.id for model in self._call(lambda client, options: client.models.list(**options), deadline).data]
        if len(models) != 1:
            raise EngineError(f"the server serves {models}; name one in the spec: {self.scheme}:URL#MODEL")
        return models[0]


def version_at_least(version: str, minimum: tuple[int, ...]) -> bool:
    """Whether a version string such as "0.12.1rc2" is at least `minimum`, comparing its leading numbers."""
    numbers = tuple(int(match.group()) for part in version.split(".")[: len(minimum)]
                    if (match := re.match(r"\d+", part)))
    return numbers >= minimum


def reusable_prefix(cached: Sequence[int], tokens: Sequence[int]) -> int:
    """How many of `tokens` a prompt cache holding `cached` can reuse: their common prefix, less at least the last
    token, which must be evaluated again for its logits."""
    return min(common_prefix(cached, tokens), len(tokens) - 1)


def check_batch(prompts: Sequence[str], candidates: Sequence[Sequence[str]]) -> None:
    """Refuse malformed batches the same way in every engine."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of strings; wrap a single prompt in a list")
    if len(prompts) != len(candidates):
        raise ValueError(f"{len(prompts)} prompts but {len(candidates)} candidate lists; give one list per prompt")
    for i, options in enumerate(candidates):
        if isinstance(options, str) or not options:
            raise ValueError(f"prompt {i}: candidates must be a non-empty list of strings")
        if len(set(options)) != len(options):
            raise ValueError(f"prompt {i}: duplicate candidates")


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences (what a prompt cache can reuse)."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def candidate_trie(candidates: Iterable[Sequence[int]]) -> dict[tuple[int, ...], set[int]]:
    """The candidates' token trie: for each path from its root (the first tokens of some candidate), the tokens that
    follow it. An engine asks for those tokens' log-probabilities after the prompt + path, each path once, however
    many candidates share it ("card_" in "card_arrival" and "card_linking")."""
    following: dict[tuple[int, ...], set[int]] = {}
    for tokens in candidates:
        for i, token in enumerate(tokens):
            following.setdefault(tuple(tokens[:i]), set()).add(token)
    return following


def path_logprob(logprobs: Mapping[tuple[int, ...], Mapping[int, float]], tokens: Sequence[int]) -> float:
    """A candidate's log-probability: the sum along its trie path of `logprobs[path][next token]`."""
    return float(sum(logprobs[tuple(tokens[:i])][token] for i, token in enumerate(tokens)))
