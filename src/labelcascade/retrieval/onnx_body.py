"""A sentence-transformers body run by onnxruntime: the vectors sentence-transformers computes in torch, in about
half the time or less.

Why: a router classifies one text at a time, and a tuned multilingual-e5-small in torch answered one text in about
twice the time of the frozen bodies, past the latency bar (BENCHMARKS.md, "Student latency"). onnxruntime runs the
same forward pass as one optimised graph (fused attention and layer norms, no Python per layer), so a body keeps its
accuracy and answers faster; the vectors match torch's to float rounding, so both runtimes share one embedder id
and one store. The packaged all-MiniLM-L6-v2 answers this way too: one text in less than half of torch's time, a
large batch in about half (BENCHMARKS.md, "Student latency" and "HTTP service").

How the graph reaches a body: `write_onnx_graph` exports the body's transformer with torch's ONNX exporter into
`model.onnx` beside the body's `model.safetensors`, and points every weight of the graph at that file (ONNX
external data: file, offset, length into the safetensors' raw little-endian tensors, checked byte for byte at
export). The graph is then a few hundred KB, one copy of the weights is kept, and onnxruntime maps them from the
file. What sentence-transformers adds around the transformer (the prompt, the length cut, lower-casing, mean
pooling, L2 normalisation) is written to `onnx_body.json` and redone here in numpy; a body of any other shape
(another pooling, extra modules) gets no graph and stays in torch.
- A tuned body gets its graph when it is tuned, in the workspace; both files fall under the digest the workspace
  records for the body folder, so they are checked before anything reads them.
- The packaged body gets its graph on its first load on a machine, in the models folder (`packaged_graph`): a
  package's folder is not ours to write into, and a graph depends on the installed package alone, so all
  workspaces share it. Its digest is recorded beside it and checked on each load.

At answer time neither torch nor transformers is imported: the tokenizer is the body's own `tokenizer.json` read by
`tokenizers`, and the graph runs on onnxruntime's CPU provider. Small batches (a chat message) run on one thread,
as the torch body does; larger ones on as many threads as the process may use. Idle threads do not spin, so a busy
machine's other work is not slowed by them.
"""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import shutil
import struct
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np

from labelcascade.atomic_file import write_text_atomically
from labelcascade.body_prompt import default_prompt
from labelcascade.file_hash import file_sha256, folder_sha256
from labelcascade.models_folder import models_folder
from labelcascade.retrieval.embedders import SMALL_BATCH, _LoadedEmbedder, load_sentence_transformer

log = logging.getLogger(__name__)

GRAPH_FILE = "model.onnx"
SETTINGS_FILE = "onnx_body.json"
WEIGHTS_FILE = "model.safetensors"
_OPSET = 17
_SAFETENSORS_F32 = "F32"
# a forward pass's fixed cost, in tokens of text (its cost grows by one token's worth per text and position after it),
# measured for all-MiniLM-L6-v2 on one thread (BENCHMARKS.md, "HTTP service: what each change to the embedder's
# batching gave")
PASS_OVERHEAD_TOKENS = 12


def _safetensors_layout(path: Path) -> tuple[int, dict]:
    """Where the tensors of a safetensors file start and, per name, its dtype, shape and byte range after that."""
    with path.open("rb") as file:
        (size,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(size))
    header.pop("__metadata__", None)
    return 8 + size, header


def write_onnx_graph(folder: str | Path) -> bool:
    """Export the sentence-transformers body saved in `folder` (safetensors) as `model.onnx` + its settings there,
    the graph's weights pointing into the folder's `model.safetensors`. True when written; False (with the reason
    logged) when the body's shape is not one this runtime reproduces or `onnx` is not installed, and the body then
    answers in torch. Reads the body from the folder, so the graph is what is on disk."""
    folder = Path(folder)
    model = load_sentence_transformer(folder)
    modules = [type(module).__name__ for module in model]
    pooling = getattr(model[1], "pooling_mode", None) if len(model) > 1 else None
    if modules != ["Transformer", "Pooling", "Normalize"] or pooling != "mean" or not model[1].include_prompt:
        log.info("the tuned body (%s, pooling %s) has no onnxruntime graph; it answers in torch", modules, pooling)
        return False
    try:
        import onnx
        from onnx import external_data_helper
    except ImportError:
        log.warning("onnx is not installed, so the tuned body answers in torch, about half as fast: "
                    "pip install onnx onnxruntime")
        return False
    import torch

    transformer, tokenizer = model[0].auto_model.eval(), model.tokenizer
    inputs = list(tokenizer("hello", return_tensors="pt").keys())
    example = tokenizer(["hello world"], return_tensors="pt")

    class LastHiddenState(torch.nn.Module):
        """The transformer with positional inputs (what the exporter traces) and one output."""

        def __init__(self, inner: torch.nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
            return self.inner(**dict(zip(inputs, tensors, strict=True))).last_hidden_state

    wrapped, buffer = LastHiddenState(transformer), io.BytesIO()
    axes = {name: {0: "batch", 1: "tokens"} for name in [*inputs, "hidden"]}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's notes on tracing, not faults of this export
        torch.onnx.export(wrapped, tuple(example[name] for name in inputs), buffer, input_names=inputs,
                          output_names=["hidden"], dynamic_axes=axes, opset_version=_OPSET, dynamo=False,
                          do_constant_folding=False)  # folding would make new tensors that are not in the file
    graph = onnx.load_from_string(buffer.getvalue())
    base, layout = _safetensors_layout(folder / WEIGHTS_FILE)
    with (folder / WEIGHTS_FILE).open("rb") as weights:
        for tensor in graph.graph.initializer:
            entry = layout.get(tensor.name.removeprefix("inner."))
            if entry is None or entry["dtype"] != _SAFETENSORS_F32 or list(tensor.dims) != entry["shape"]:
                if len(tensor.raw_data) > 1 << 20:  # a weight not in the file would make a second copy of it
                    log.warning("the tuned body's weight %s is not in %s; it answers in torch", tensor.name,
                                WEIGHTS_FILE)
                    return False
                continue
            start, end = entry["data_offsets"]
            weights.seek(base + start)
            if tensor.data_type != onnx.TensorProto.FLOAT or weights.read(end - start) != tensor.raw_data:
                raise RuntimeError(f"{folder / WEIGHTS_FILE}: {tensor.name} differs from what was read from it; "
                                   "the body was changed while it was being exported")
            external_data_helper.set_external_data(tensor, WEIGHTS_FILE, offset=base + start, length=end - start)
            tensor.ClearField("raw_data")
    (folder / GRAPH_FILE).write_bytes(graph.SerializeToString())
    settings = {
        "inputs": inputs,
        "dim": int(model.get_embedding_dimension()),
        "max_seq_length": int(model.max_seq_length),
        "prompt": default_prompt(model),
        "lowercase": bool(getattr(model[0], "do_lower_case", False)),
        "pad_id": int(tokenizer.pad_token_id or 0),
    }
    (folder / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")
    return True


def packaged_graph(model_dir: Path, name: str) -> Path | None:
    """The folder of the packaged body `model_dir` with its onnxruntime graph, in the models folder; made on the
    first call on a machine (torch exports it, about ten seconds), reused after. None, with the reason logged, when
    it cannot be made (a read-only cache folder, an exporter that fails): the body then answers in torch.

    The folder is named after the name and the sha256 of the package's weights, so another version of the package
    gets a graph of its own; it holds a copy of the body (the graph's weights point into its own safetensors, and
    onnxruntime reads external data only from beside the graph). Its digest (`folder_sha256`) is recorded beside it
    when it is made and checked on every load: a graph changed or cut short is made again, never run. A lock file
    makes concurrent first loads (the service's embedder processes, Ray workers) export it once."""
    folder = models_folder() / f"{name}-onnx-{file_sha256(model_dir / WEIGHTS_FILE)[:16]}"
    record = folder.with_name(folder.name + ".sha256")
    if _made(folder, record):
        return folder
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        with (folder.parent / f".{folder.name}.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed, or the process dies
            if _made(folder, record):  # another process made it while this one waited
                return folder
            log.info("exporting %s to onnxruntime once, into %s", name, folder)
            with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}-") as scratch:
                made = Path(shutil.copytree(model_dir, Path(scratch) / "body"))
                if not write_onnx_graph(made):
                    return None
                record.unlink(missing_ok=True)
                shutil.rmtree(folder, ignore_errors=True)  # a graph that failed its check
                made.rename(folder)
            write_text_atomically(record, folder_sha256(folder) + "\n")
    except OSError as error:
        log.warning("the packaged body %s answers in torch, about half as fast: its onnxruntime graph could not be "
                    "written into %s (%s); set LABELCASCADE_MODELS to a writable folder", name, folder.parent, error)
        return None
    except Exception as error:  # noqa: BLE001 - the graph only makes answers faster; torch gives the same vectors
        log.warning("the packaged body %s answers in torch, about half as fast: torch could not export its "
                    "onnxruntime graph (%s: %s)", name, type(error).__name__, error)
        return None
    return folder


def _made(folder: Path, record: Path) -> bool:
    """Whether `folder` holds a whole graph: its digest is the one recorded when it was made."""
    try:
        return folder.is_dir() and record.read_text().strip() == folder_sha256(folder)
    except (OSError, ValueError):
        return False


def usable_threads() -> int:
    """The threads a large batch may use: OMP_NUM_THREADS where set (Ray sets it to an actor's CPUs), otherwise
    the CPUs this process may run on."""
    configured = os.environ.get("OMP_NUM_THREADS", "")
    if configured.isdigit() and int(configured) > 0:
        return int(configured)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class OnnxBodyEmbedder(_LoadedEmbedder):
    """The graph `write_onnx_graph` wrote, with its tokenizer and pooling: texts in, L2-normalised rows out, as
    the torch body computes them (its id names the body, not the runtime: their vectors go in one store)."""

    def __init__(self, folder: str | Path, *, name: str):
        from tokenizers import Tokenizer

        self.folder = Path(folder)
        self.settings = json.loads((self.folder / SETTINGS_FILE).read_text())
        self.id = f"sentence-transformers:{name}"
        self.dim = int(self.settings["dim"])
        self._tokenizer = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(self.settings["max_seq_length"])
        self._sessions: dict[int, object] = {}
        self._lock = threading.Lock()

    def session(self, threads: int):
        """The onnxruntime session on `threads` threads, made on first use (each maps the weights from the file
        and packs its own copy of the matrices, tens of MB)."""
        with self._lock:
            if threads not in self._sessions:
                import onnxruntime

                options = onnxruntime.SessionOptions()
                options.intra_op_num_threads = threads
                options.inter_op_num_threads = 1
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
                options.log_severity_level = 3  # errors only: its notes on the graph are not the user's concern
                self._sessions[threads] = onnxruntime.InferenceSession(
                    str(self.folder / GRAPH_FILE), options, providers=["CPUExecutionProvider"])
            return self._sessions[threads]

    def _embed(self, texts: list[str], batch_size: int) -> np.ndarray:
        """Rows for `texts` (non-empty), in batches of texts of similar length so little is padding."""
        prompt, lowercase = self.settings["prompt"], self.settings["lowercase"]
        encodings = self._tokenizer.encode_batch([prompt + (text.lower() if lowercase else text) for text in texts])
        threads = 1 if len(texts) <= SMALL_BATCH else usable_threads()
        lengths = np.array([len(encoding.ids) for encoding in encodings])
        session, order = self.session(threads), np.argsort(-lengths, kind="stable")
        widths = lengths[order]
        rows = np.empty((len(texts), self.settings["dim"]), dtype=np.float32)
        for passed in forward_passes(widths, batch_size):
            chosen, width = order[passed], int(widths[passed.start])
            feed = {name: np.zeros((len(chosen), width), dtype=np.int64) for name in self.settings["inputs"]}
            feed["input_ids"].fill(self.settings["pad_id"])
            for row, index in enumerate(chosen):
                encoding = encodings[index]
                size = len(encoding.ids)
                feed["input_ids"][row, :size] = encoding.ids
                feed["attention_mask"][row, :size] = 1
                if "token_type_ids" in feed:
                    feed["token_type_ids"][row, :size] = encoding.type_ids
            (hidden,) = session.run(None, feed)
            mask = feed["attention_mask"][..., None].astype(np.float32)
            pooled = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
            rows[chosen] = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return rows


def forward_passes(widths: np.ndarray, batch_size: int) -> list[slice]:
    """Texts of `widths` tokens, sorted widest first, cut into forward passes of at most `batch_size` texts at the
    least cost, each pass costing PASS_OVERHEAD_TOKENS plus its texts times its widest text (the others are padded to
    it). Why not `batch_size` texts at a time: in a small batch of mixed lengths (a service's few requests) most of
    the positions were padding; the widest texts go in passes of their own when their padding would cost more than
    one more pass. Among many texts of similar lengths it makes as many passes as `batch_size` at a time would.
    (Dynamic programming over the sorted widths: the cheapest cut of the first `end` texts ends with one pass from
    some `start`.)"""
    count = len(widths)
    cheapest, first = np.zeros(count + 1), np.zeros(count + 1, dtype=int)
    for end in range(1, count + 1):
        starts = np.arange(max(0, end - batch_size), end)
        cost = cheapest[starts] + PASS_OVERHEAD_TOKENS + (end - starts) * widths[starts]
        best = int(np.argmin(cost))  # ties: the earliest start, the fewest passes
        cheapest[end], first[end] = cost[best], starts[best]
    passes, end = [], count
    while end:
        passes.append(slice(int(first[end]), end))
        end = int(first[end])
    return passes[::-1]
