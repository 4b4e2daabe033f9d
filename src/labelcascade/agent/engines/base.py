"""The engine protocol: score candidate continuations of prompts, batched; nothing else.

Every backend (llama.cpp, a vLLM server, vLLM in-process, transformers) is one small adapter that implements
`score`. Engines never generate free text that must be parsed: for each prompt they return the log-probability of
each candidate continuation (the whole continuation, every token of it), and `normalize` turns those into
probabilities over the candidates.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


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


def normalize(logprobs: dict[str, float], temperature: float = 1.0) -> dict[str, float]:
    """Probabilities over the candidates from their log-probabilities, optionally softened by a temperature."""
    keys = list(logprobs)
    scaled = np.array([logprobs[key] for key in keys]) / temperature
    weights = np.exp(scaled - scaled.max())
    probabilities = weights / weights.sum()
    return dict(zip(keys, probabilities.tolist(), strict=True))


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
