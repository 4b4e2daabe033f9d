"""Any OpenAI-compatible server (llama.cpp's server, llama-cpp-python's, Ollama, a hosted API), reached with the
`openai` client, for servers that cannot be asked the log-probability of a given token (vLLM's `logprob_token_ids`,
which the `vllm:` engine uses for exact scores).

What every such server can do is show the top K log-probabilities of the next token, keyed by the token's text, on
the legacy completions route (`/v1/completions`, `logprobs=K`, one token at temperature 0). The prompt goes as text:
the rendered prompts already hold any chat turns, and the server tokenizes them (adding its <bos> as it does for any
completion). A prompt's candidates are then scored by walking a text trie over those top-K tokens:

- ask the prompt's next-token top K; each candidate follows the longest shown token its text starts with and adds
  that token's log-probability (a bare space before a letter does not count: these models' tokenizers join the
  space to the word, so " " + "Sci" is not the model's own way to write " Sci");
- candidates that followed the same token go on together: the next request is the prompt plus that token's text;
- a candidate stops once no other candidate shares its path (the tokens so far tell it apart), or once its text is
  used up, or after `max_depth` requests along its path;
- a candidate whose next piece is not among the shown tokens gets the lowest log-probability shown instead, and stops;
- a candidate that follows a piece ending inside a word (" S" of " Sci/Tech") may be written by the model with a
  longer token that is not shown (" Sci"): it scores at least what it had before that piece plus the lowest shown.

So with labels whose first tokens differ, a label's score is its first token's log-probability, from one request per
prompt; one more where the server shows a shorter piece two labels share (" S" of " Sci/Tech" and " Sports").
Requests for different prompts run concurrently; a prompt's own requests, one after another.

Limits: these scores approximate the whole-continuation log-probabilities of the llama.cpp and vLLM engines (tests
compare the two on the same model).
- First-token scoring: what follows a distinct first token (the rest of a long label, the blank line that closes an
  answer, a chat turn's end marker) is not scored, so the scores are upper bounds of the exact ones, and candidates of
  different lengths are not compared on the same footing.
- Ties: candidates that still share their path after `max_depth` requests get the same score.
- The floor: a candidate whose next token is not in the top K gets the lowest log-probability shown, an upper bound of
  its own, so a distribution with many likely tokens flatters the labels outside it, and they all tie.
- Tokenization: matching is on text, and the path a candidate takes may not be the model's own tokenization of it
  (a shown short piece, " c" for " card", where the model writes " card" with one token it did not show). Within a
  word this keeps the bound (the rule above): which of two near ties makes the top K moves with kernel rounding, so
  " S" is shown after one prompt order and not after another (seen with llama-cpp-python's server). A server whose
  token texts hide part of the text (a special token shown as empty, a partial UTF-8 character), tokens that cross
  the candidate's end, or a prompt plus a token's text that the server tokenizes differently from the path it took,
  misdirect the walk; the score is then neither the exact one nor a bound of it.
- K: the default asks for 20; a server that refuses it and names its maximum in the refusal (OpenAI's own legacy
  route allows 5) is asked for that from then on. A smaller K floors more labels.

`stats.computed_tokens` is each request's prompt tokens less those the server says it found in its cache (llama.cpp's
server does, in `usage.prompt_tokens_details`); `stats.candidate_tokens` counts the requests, one trie node each. There
is no chat template (`chat_template` None), so the `auto` template prompts as a base model. Deadlines are kept as the
vLLM engine keeps them (`OpenAIServerMixin`): the `timeout` of a scoring call bounds the whole batch.
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from labelcascade.agent.engines.base import EngineError, OpenAIServerMixin, ScoringEngine

DEFAULT_TOP_LOGPROBS = 20  # vLLM's default maximum; lowered to what a server that refuses it names
DEFAULT_MAX_DEPTH = 4  # requests along one trie path: a label rarely needs more tokens to stand apart


class OpenAICompatibleEngine(OpenAIServerMixin, ScoringEngine):
    """Scores candidates, approximately, on any OpenAI-compatible server; see the module docstring."""

    name = "OpenAI-compatible server"
    scheme = "openai"

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        *,
        api_key: str | None = None,
        top_logprobs: int = DEFAULT_TOP_LOGPROBS,
        max_depth: int = DEFAULT_MAX_DEPTH,
        timeout: float = 60.0,
        max_retries: int = 2,
        concurrency: int = 8,
    ):
        """`api_key`: by default the OPENAI_API_KEY environment variable, else "EMPTY" (local servers ignore it).
        `top_logprobs` is lowered at the first request if the server refuses it and names its own maximum."""
        try:
            import openai
        except ImportError as error:
            raise EngineError("the OpenAI-compatible engine needs the openai client: pip install openai") from error
        if top_logprobs < 1 or max_depth < 1:
            raise ValueError("top_logprobs and max_depth must be at least 1")
        api_key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
        self._connect(openai, base_url, api_key=api_key, timeout=timeout, max_retries=max_retries)
        self.top_logprobs = top_logprobs
        self.max_depth = max_depth
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="openai-score")
        try:  # asking for the only model fails the load on a server that is not there (a named one, the first call)
            self.model = model or self._only_model(time.monotonic() + timeout)
        except EngineError as error:
            self.close()
            raise EngineError(f"{base_url}: {error}") from error
        super().__init__(f"openai:{base_url}#{self.model}")
        self._stats_lock = threading.Lock()  # requests for different prompts finish on different threads

    def tokenize(self, text: str, *, bos: bool, deadline: float | None = None) -> list[int]:
        """Not offered: this engine sends text and reads token texts, never token ids, and the servers it is for
        have no common tokenizing route (llama.cpp's, llama-cpp-python's and vLLM's differ; Ollama and hosted APIs
        have none)."""
        raise NotImplementedError(f"{self.spec} scores text: the server's tokens are not available to it")

    # --- scoring --------------------------------------------------------------------------------------------

    def _score(
        self, prompts: Sequence[str], candidates: Sequence[Sequence[str]], deadline: float | None
    ) -> list[dict[str, float]]:
        for options in candidates:
            for option in options:
                if not option:
                    raise EngineError(f"the candidate {option!r} is empty: it encodes to no tokens")
        futures = [self._pool.submit(self._score_prompt, prompt, options, deadline)
                   for prompt, options in zip(prompts, candidates, strict=True)]
        try:
            return [future.result() for future in futures]
        finally:
            for future in futures:  # after a failure, the prompts not yet started are not sent
                future.cancel()

    def _score_prompt(self, prompt: str, options: Sequence[str], deadline: float | None) -> dict[str, float]:
        """Walk the text trie of `options` over the server's top-K tokens (module docstring)."""
        scores = dict.fromkeys(options, 0.0)
        bounds: dict[str, float] = {}  # for candidates that followed a piece ending inside a word (module docstring)
        paths: list[tuple[str, list[str]]] = [("", list(options))]  # (text after the prompt, candidates along it)
        for depth in range(self.max_depth):
            following = []
            for path, members in paths:
                top, floor = self._next_token_logprobs(prompt + path, deadline, first=depth == 0)
                branches: dict[str, list[str]] = {}
                for option in members:
                    rest = option[len(path):]
                    token = max((token for token in top if _begins_with_token(rest, token)), key=len, default=None)
                    if token is None:  # not among the shown tokens: an upper bound, and the walk ends here
                        scores[option] += floor
                        continue
                    if _ends_inside_a_word(rest, token):
                        bounds[option] = max(bounds.get(option, -math.inf), scores[option] + floor)
                    scores[option] += top[token]
                    branches.setdefault(token, []).append(option)
                for token, group in branches.items():
                    unfinished = [option for option in group if len(option) > len(path) + len(token)]
                    if len(group) > 1 and unfinished:  # not yet told apart (or a longer twin of a finished one)
                        following.append((path + token, unfinished))
            paths = following
            if not paths:
                break
        return {option: max(score, bounds.get(option, score)) for option, score in scores.items()}

    def _next_token_logprobs(self, text: str, deadline: float | None, *, first: bool) -> tuple[dict[str, float], float]:
        """The server's top-K next-token log-probabilities after `text`, by token text, and the lowest of them."""
        while True:
            k = self.top_logprobs
            try:
                response = self._call(
                    lambda client, options: client.completions.create(
                        model=self.model, prompt=text, max_tokens=1, temperature=0.0, logprobs=k, **options
                    ),
                    deadline,
                )
                break
            except EngineError as error:
                allowed = _allowed_top_logprobs(error, k)
                if allowed is None:
                    raise
                self.top_logprobs = allowed  # the server's own maximum, kept for later requests
        shown = _shown_logprobs(response.choices[0].logprobs if response.choices else None)
        if not shown:
            raise EngineError(
                f"{self.spec} returned no top log-probabilities on /v1/completions: the server does not support "
                "`logprobs` there"
            )
        top: dict[str, float] = {}
        for token, value in shown:
            if token and token not in top:  # an empty text matches anything; of two tokens with one text, the likelier
                top[token] = value
        with self._stats_lock:
            usage = response.usage
            prompt_tokens = usage.prompt_tokens if usage is not None else 0
            details = getattr(usage, "prompt_tokens_details", None)
            cached = (getattr(details, "cached_tokens", None) or 0) if details is not None else 0
            if first:
                self.stats.prompts += 1
                self.stats.prompt_tokens += prompt_tokens
            self.stats.computed_tokens += prompt_tokens - cached
            self.stats.candidate_tokens += 1
        return top, min(value for _, value in shown)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()


def _begins_with_token(text: str, token: str) -> bool:
    """Whether `text` starts with the token's text as the model would write it. A bare space before a letter is not
    such a start: the tokenizers of these models join a space to the word after it (" Sci", not " " + "Sci"), so that
    path is not the model's own, and its log-probability would stand for the word's."""
    if not text.startswith(token):
        return False
    return not (token.strip(" ") == "" and text[len(token) : len(token) + 1].isalpha())


def _ends_inside_a_word(text: str, token: str) -> bool:
    """Whether the token's text, at the start of `text`, stops between two letters or digits of one word."""
    return len(text) > len(token) and token[-1:].isalnum() and text[len(token)].isalnum()


def _shown_logprobs(logprobs) -> list[tuple[str, float]]:
    """The (token text, log-probability) pairs of a completion's first token, highest first, in either shape servers
    answer: the legacy `top_logprobs` (a dict per token) or llama.cpp server's chat-style `content` list."""
    if logprobs is None:
        return []
    if logprobs.top_logprobs:
        pairs = list((logprobs.top_logprobs[0] or {}).items())
    else:
        content = (logprobs.model_extra or {}).get("content") or [{}]
        pairs = [(entry.get("token", ""), entry.get("logprob")) for entry in content[0].get("top_logprobs") or []]
    return sorted(((token, float(value)) for token, value in pairs if value is not None), key=lambda pair: -pair[1])


def _allowed_top_logprobs(error: EngineError, asked: int) -> int | None:
    """The lower K a server's refusal names ("... greater than max allowed: 20", "... less than or equal to 5"), or
    None when the error is not about `logprobs`."""
    cause = error.__cause__
    if getattr(cause, "status_code", None) not in (400, 422) or "logprob" not in str(cause).lower():
        return None
    limits = [int(number) for number in re.findall(r"\d+", str(cause)) if 0 < int(number) < asked]
    return max(limits, default=None)
