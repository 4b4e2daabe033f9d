"""An embedder that runs in child processes of its own, for the HTTP service.

Why a process: the sentence-transformers forward pass is Python-heavy and holds the interpreter lock for much of its
time. In one process with the service's event loop, requests waited for the lock to be parsed and answered while the
model ran. In child processes the model has interpreters of its own; the service's worker thread only waits on pipes
(which releases the lock) while the event loop goes on taking requests.

Why several one-thread children rather than one child with a thread per core: the service's batches are small (the
requests that arrived during the previous batch), and torch's threads share out a small batch's matrices poorly. A
batch is sorted by length and cut into one contiguous run per child, so each child's texts are padded to similar
lengths; the runs are cut to cost about the same (more of the short texts, fewer of the long), so the children
finish together; a batch of a few texts goes to one child. (BENCHMARKS.md, "HTTP service".)

Each child is a new interpreter (`python -m labelcascade.retrieval.embedder_process SPEC`: not a fork, which is
unsafe with torch's threads running, and not multiprocessing's spawn, which re-runs the caller's main script). It
loads the embedder once, then answers one list of texts at a time over its stdin and stdout: texts go as JSON,
vectors come back as raw float32 bytes (nothing is pickled); anything a library prints goes to its stderr. It
ignores Ctrl-C (the service shuts it down in order) and exits when its parent goes away. A child that dies is
started again once, and the call repeated.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection

import numpy as np

from labelcascade.retrieval.embedders import DEFAULT_BATCH_SIZE, SMALL_BATCH, load_embedder

START_TIMEOUT_S = 300
READY, VECTORS, ERROR = b"R", b"V", b"E"  # the first byte of each message from a child


class EmbedderProcessError(RuntimeError):
    """An embedder's child process could not start, or failed to embed."""


class EmbedderProcess:
    """The embedder named by `spec` (as `load_embedder` takes it), in `workers` one-thread child processes (None:
    one per core, at most 4); an `Embedder` to the session. Close it when done (or use it as a context manager)."""

    def __init__(self, spec: str, *, workers: int | None = None):
        self.spec = spec
        self.workers = workers if workers is not None else max(1, min(4, os.cpu_count() or 1))
        self.on_idle: Callable[[], None] | None = None
        self._lock = threading.Lock()
        self._children: list[_Child] = []
        self._ahead: _Ahead | None = None
        self._broken = False
        try:
            self._children = _started(spec, self.workers)
        except BaseException:
            self.close()
            raise
        self.id, self.dim = self._children[0].id, self._children[0].dim

    def embed(self, texts: Sequence[str], batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("embed() takes a sequence of texts; wrap a single text in a list")
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:
            answers, runs = self._collected(texts, batch_size)
            if answers is None:
                runs = self._runs(texts)
                try:
                    answers = self._ask(texts, runs, batch_size)
                except (EOFError, OSError):  # a child died (killed, out of memory): once more with new ones
                    self._restart()
                    answers = self._ask(texts, runs, batch_size)
        if self.on_idle is not None:
            self.on_idle()
        vectors = np.empty((len(texts), self.dim), dtype=np.float32)
        for run, (kind, value) in zip(runs, answers, strict=True):
            if kind == ERROR:
                raise EmbedderProcessError(f"embedder {self.spec!r}: {value.decode()}")
            vectors[run] = np.frombuffer(value, dtype=np.float32).reshape(len(run), self.dim)
        return vectors

    def embed_soon(self, texts: Sequence[str], batch_size: int = DEFAULT_BATCH_SIZE) -> bool:
        """Start embedding `texts` if the children are free, and return at once (False: they were busy, nothing
        started). A later `embed` of the same texts only collects the vectors; any other call first collects and
        drops them. The service sends its next batch this way when `on_idle` says the children finished the
        previous one, so they embed it while the worker thread still finishes the previous batch and its answers
        go out, instead of waiting for the worker."""
        if len(texts) == 0 or not self._lock.acquire(blocking=False):
            return False
        try:
            if self._ahead is not None or self._broken or not self._children:
                return False
            runs = self._runs(texts)
            try:
                self._send(texts, runs, batch_size)
            except OSError:  # a child died: the next `embed` starts new ones (not here, on the caller's thread)
                self._broken = True
                return False
            self._ahead = _Ahead(list(texts), runs, batch_size)
            return True
        finally:
            self._lock.release()

    def _collected(self, texts: Sequence[str], batch_size: int) -> tuple[list[tuple[bytes, bytes]] | None, list]:
        """The answers to what `embed_soon` sent, if it sent these texts; else (None, []), with whatever it sent
        collected and dropped, and the children restarted if one died."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and not self._broken:
            try:
                answers = [child.receive() for child, _ in zip(self._children, ahead.runs, strict=False)]
            except (EOFError, OSError):
                self._broken = True
            else:
                if ahead.texts == list(texts) and ahead.batch_size == batch_size:
                    return answers, ahead.runs
        if self._broken:
            self._restart()
        return None, []

    def _runs(self, texts: Sequence[str]) -> list[np.ndarray]:
        """`texts`' positions sorted by length, cut into one run per child (`balanced_cuts`)."""
        lengths = np.array([len(text) for text in texts])
        order = np.argsort(lengths, kind="stable")
        cuts = balanced_cuts(lengths[order], min(len(self._children), -(-len(texts) // SMALL_BATCH)))
        return [order[start:end] for start, end in zip([0, *cuts], [*cuts, len(texts)], strict=True)]

    def _send(self, texts: Sequence[str], runs: list[np.ndarray], batch_size: int) -> None:
        for child, run in zip(self._children, runs, strict=False):  # all children start before any answer is read
            child.send([texts[i] for i in run], batch_size)

    def _ask(self, texts: Sequence[str], runs: list[np.ndarray], batch_size: int) -> list[tuple[bytes, bytes]]:
        self._send(texts, runs, batch_size)
        return [child.receive() for child, _ in zip(self._children, runs, strict=False)]

    def _restart(self) -> None:
        for child in self._children:
            child.stop()  # a live child may hold an unread answer: start every one afresh
        self._children = _started(self.spec, self.workers)
        self._broken = False

    def close(self) -> None:
        """Stop the child processes."""
        with self._lock:
            for child in self._children:
                child.stop()
            self._children = []
            self._ahead = None

    def __enter__(self) -> EmbedderProcess:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __deepcopy__(self, memo) -> EmbedderProcess:
        return self

    def __repr__(self) -> str:
        return f"EmbedderProcess(id={getattr(self, 'id', None)!r}, spec={self.spec!r}, workers={self.workers})"


RUN_OVERHEAD_CHARS = 40  # a run's fixed cost (one forward pass, the pipes), in characters of text


def balanced_cuts(lengths: np.ndarray, runs: int) -> list[int]:
    """Where to cut texts sorted by length (`lengths`, ascending) into at most `runs` contiguous runs whose largest
    cost is smallest. A run padded to its longest text costs about `len(run) * longest + overhead` (an onnxruntime
    body pads less: `onnx_body.forward_passes` gives wide texts passes of their own, so this is a run's most):
    cutting into equal counts gives the run of the longest texts the most work, and every child waits for it
    (BENCHMARKS.md, "HTTP service"). Found by bisecting the largest cost, filling each run greedily."""
    count = len(lengths)
    if runs <= 1 or count <= 1:
        return []
    padded = lengths.astype(np.float64)

    def cuts_within(limit: float) -> list[int] | None:
        cuts, start = [], 0
        while start < count:
            cost = (np.arange(1, count - start + 1) * padded[start:] + RUN_OVERHEAD_CHARS)
            end = start + max(1, int(np.searchsorted(cost, limit, side="right")))
            if end < count:
                if len(cuts) == runs - 1:
                    return None
                cuts.append(end)
            start = end
        return cuts

    low, high = 0.0, float(count * padded[-1] + RUN_OVERHEAD_CHARS)
    best = cuts_within(high)
    for _ in range(24):
        middle = (low + high) / 2
        found = cuts_within(middle)
        if found is None:
            low = middle
        else:
            high, best = middle, found
    return best


@dataclass
class _Ahead:
    """What `embed_soon` sent to the children, whose answers are still to be read."""

    texts: list[str]
    runs: list[np.ndarray]
    batch_size: int


def _started(spec: str, count: int) -> list[_Child]:
    """`count` children, loading their models at the same time, each ready to embed."""
    children = [_Child(spec) for _ in range(count)]
    try:
        for child in children:
            child.wait_until_ready()
    except BaseException:
        for child in children:
            child.stop()
        raise
    return children


class _Child:
    """One child process and the two ends of its pipes."""

    def __init__(self, spec: str):
        self.spec = spec
        # one thread each (module docstring): torch takes its thread count from OMP_NUM_THREADS when imported,
        # onnxruntime's bodies when they size a batch's session (onnx_body.usable_threads)
        self.process = subprocess.Popen([sys.executable, "-m", __name__, spec], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
        self.sending: Connection | None = Connection(os.dup(self.process.stdin.fileno()), readable=False)
        self.receiving: Connection | None = Connection(os.dup(self.process.stdout.fileno()), writable=False)
        self.process.stdin.close()
        self.process.stdout.close()

    def wait_until_ready(self) -> None:
        spec = self.spec
        if not self.receiving.poll(START_TIMEOUT_S):
            self.stop()
            raise EmbedderProcessError(f"embedder {spec!r}: its process did not start within {START_TIMEOUT_S} s")
        try:
            kind, value = self.receive()
        except EOFError:
            self.stop()
            raise EmbedderProcessError(f"embedder {spec!r}: its process exited while loading the model") from None
        if kind == ERROR:
            self.stop()
            raise EmbedderProcessError(f"embedder {spec!r}: {value.decode()}")
        ready = json.loads(value)
        self.id, self.dim = ready["id"], int(ready["dim"])

    def send(self, texts: list[str], batch_size: int) -> None:
        self.sending.send_bytes(json.dumps({"texts": texts, "batch_size": batch_size}).encode())

    def receive(self) -> tuple[bytes, bytes]:
        data = self.receiving.recv_bytes()
        return data[:1], data[1:]

    def stop(self) -> None:
        if self.sending is not None:
            try:
                self.sending.send_bytes(b"")  # stop
            except OSError:
                pass
            self.sending.close()
            self.sending = None
        if self.receiving is not None:
            self.receiving.close()
            self.receiving = None
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _serve(spec: str) -> None:
    """A child: load the embedder, then embed each list of texts sent until told to stop (b"") or orphaned."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    asking = Connection(0, writable=False)
    answering = Connection(os.dup(1), readable=False)
    os.dup2(2, 1)  # what libraries print must not reach the parent as a message
    try:
        embedder = load_embedder(spec)
    except Exception as error:  # noqa: BLE001 - any load failure is reported to the parent, which raises it
        answering.send_bytes(ERROR + f"{type(error).__name__}: {error}".encode())
        return
    answering.send_bytes(READY + json.dumps({"id": embedder.id, "dim": embedder.dim}).encode())
    while True:
        try:
            asked = asking.recv_bytes()
        except (EOFError, OSError):  # the parent is gone
            return
        if not asked:
            return
        request = json.loads(asked)
        try:
            vectors = embedder.embed(request["texts"], request["batch_size"])
            answer = VECTORS + np.ascontiguousarray(vectors, dtype=np.float32).tobytes()
        except Exception as error:  # noqa: BLE001 - the parent raises it for the caller
            answer = ERROR + f"{type(error).__name__}: {error}".encode()
        try:
            answering.send_bytes(answer)
        except OSError:  # the parent stopped listening (it is restarting its children, or gone)
            return


if __name__ == "__main__":
    _serve(sys.argv[1])
