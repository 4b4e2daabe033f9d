"""The HTTP service for chat assistants: one workspace's session behind a small JSON API.

    POST /v1/classify   {"text": "..."} or {"texts": [...]}, optional "top"  ->  {"answers": [...], "latency_ms"}
                        and headers X-Labelcascade-Label / -Route / -Confidence (one value per text)
    POST /v1/feedback   {"text", "label"} (or "labels"), optional "retrain"  ->  stored as a `review` example
    POST /v1/retrain    optional {"body": true, "tuning_seconds"}  ->  202; the fallback (and body) retrained behind
    GET  /v1/task       the task's labels, shape and the cascade's current policy
    GET  /healthz       liveness; never needs the API key and never waits for the classifier
    GET  /metrics       Prometheus text: requests by endpoint and status, answers by route, latencies, batch sizes
    GET  /docs          the OpenAPI page (Swagger UI; /redoc: ReDoc), its scripts served from the package: works offline

`create_app(session)` builds the app around a session you own; `serve(workspace)` opens a workspace and runs
it with uvicorn on 127.0.0.1 (another host only when asked: the service is for the assistant beside it). Serving
another address without an API key is refused unless `allow_no_key` says it is meant (e.g. behind a proxy that
authenticates): an open service would let anyone who can reach it use the machine's LLM and write feedback.

Why one worker thread: a `Session` is not thread-safe (its llama.cpp context, SQLite connection and FAISS index
each expect one caller at a time). Every call into it, classifying or not, runs on one single-thread executor, in
the order it was asked for; the event loop only parses, validates and answers HTTP.

Why the embedder has processes of its own (`serve`; retrieval/embedder_process.py): the sentence-transformers
forward pass holds Python's interpreter lock for much of its time, and in the service's process it kept the event
loop from parsing and answering requests while it ran. In child processes (one core each; a batch is cut by length
among them) it has interpreters of its own, and the worker thread waits on pipes. `create_app` users get the same
by opening their session with `embedder=EmbedderProcess(spec)`.

Why the service's own numpy runs on one thread (`serve`): its main process multiplies small matrices (a batch's
vectors by the head's weights), which numpy's BLAS splits with a thread of its own once a batch holds more than a few
texts; that thread then spins, waiting for more work, on the cores the embedder's processes need. Under load it used
more CPU than the rest of the process, answering HTTP included (BENCHMARKS.md, "HTTP service: what each change to
the embedder's batching gave").
`create_app` users who serve from a process of their own get the same with `threadpoolctl.threadpool_limits(1,
"blas")`.

Why micro-batching: one embedding call for 16 texts costs far less than 16 calls, and the LLM engine scores a batch
of prompts in one call too. Classify requests therefore wait in a queue; whenever the worker is free it takes
every request waiting (up to `max_texts` texts, a request is never split), answers them in one
`session.classify(texts)` call and hands each request its own slice. There is no waiting window: an idle service
answers a lone request at once, and a busy one batches exactly the requests that arrived during the previous batch.

Why the next batch is embedded ahead: embedding is most of a batch's time, and the embedder's children would
otherwise sit idle while the worker thread finishes a batch (the fallback, the answers) and while its callers get
their answers and send their next requests. When an `EmbedderProcess` (what `serve` uses) says its children are
done with the batch's texts (`on_idle`), the requests waiting at that moment become the next batch and its texts go
to the children at once (`embed_soon`); the worker's `classify` of that batch then only collects the vectors. A batch
is still answered whole and in turn; only its embedding starts early. (BENCHMARKS.md, "HTTP service".)

Who may overrule whom: feedback is a `review` example, which outranks the LLM's labels, but not a gold label: a text
the workspace holds with a gold label (the task's seeds, `labelcascade add`) keeps it, and feedback giving it
another label gets 409; a person with the workspace changes gold labels with `labelcascade add --review`. Feedback
is rate-limited (`max_feedback_per_minute`, 429 past it), so a caller cannot flood the store with labels.

Feedback is stored at once (and committed to the workspace's database) but does not retrain the fallback unless
the request says `"retrain": true`: retraining reads every stored example, which is cheap for hundreds of examples
but not for tens of thousands, so the caller decides. Otherwise the correction counts from the next retrain: the
cascade's own after every `retrain_every` LLM labels, the next feedback with `"retrain": true`, or a
`labelcascade retrain` run beside the service.

Why the service reads the workspace again: people curate a served workspace from another terminal (`labelcascade add`
retrains the fallback, `calibrate` chooses new thresholds, `add-label` adds a label), and a session reads those once,
when it opens. Before each batch, feedback, task read and retrain, the worker thread asks whether another process has
saved task.yaml, settings.json or the fallback model since (`Session.refresh`, which the session's methods call
themselves: a few stat calls) and, if so, reads them again, so the next answers come from what was saved, without
a restart. A retrain of the service's own that is being fitted meanwhile is still swapped in: its labels are among
the task's (labels are only ever added).

Why retraining is off the request path: training on thousands of examples takes seconds to minutes, and on the
worker thread it would stall every request behind it. A retrain (asked by feedback, or due after `retrain_every`
LLM labels; the session's own `auto_retrain` is off while the service runs) reads its snapshot of the store on the
worker thread, trains on a thread of its own while the old model answers, and is swapped in on the worker thread
between two batches, so a batch is answered wholly by the old model or wholly by the new one. One retrain runs at a
time; asks that come during it are joined into one more. `GET /v1/task` says whether one is running and which
model answers (`fallback`). A service stopped mid-retrain keeps the old model; the LLM labels it had not trained
on are still counted, so the next retrain takes them.

A body retrain (`POST /v1/retrain {"body": true}`, workspaces with embedder 'tuned': `Session.retrain(body=True)`)
tunes the body for minutes on the training thread while the old body and model answer. It is begun before the
request is answered, so a refusal comes back to the caller (409 while any retrain runs or another process holds
the workspace's body lock, 422 for a workspace without a tuned body); it is never joined with other asks. At its
swap the embedder's child processes are started on the new body first, then the swap and the switch to them happen
on the worker thread between two batches, and the old ones are stopped (`GET /v1/task`'s `embedder` changes;
while it tunes, its `body_tuning` counts the pairs trained).

Limits: request bodies over `max_body_bytes` get 413 (FastAPI's own limit; its body is the plain text "Content Too
Large" when the Content-Length header already says so); more than `max_texts` texts, or a text longer than
`max_text_chars` characters, get 422. Other errors are JSON (`{"detail": ...}`) and never carry a traceback: a
classifier failure is logged with its traceback and answered 500; a body that another process has tuned again (a
`labelcascade retrain --body` beside the service) is answered 503, saying to restart the service. The cascade
itself never raises for a failing LLM; it answers with route `degraded`.

Why `serve` unwinds on SIGTERM (termination.py): uvicorn stops gracefully on SIGTERM, then raises the signal again
with the handler that was there before it started, so that the process ends as the signal says. With Python's
default handler that ended the process before `serve` closed the session (its FAISS index unsaved) and the embedder
processes; inside `sigterm_unwinds` the signal unwinds `serve` through its cleanup first.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, TypeVar
from urllib.parse import quote

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response, Security
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from threadpoolctl import threadpool_limits

from labelcascade import __version__
from labelcascade.agent import Policy, Retraining
from labelcascade.records import Prediction, Route, Source
from labelcascade.retrieval import EmbedderMismatchError
from labelcascade.retrieval.embedder_process import EmbedderProcess
from labelcascade.session import BodyChangedError, BodyRetraining, Session
from labelcascade.termination import sigterm_unwinds
from labelcascade.workspace import Workspace, WorkspaceError

logger = logging.getLogger(__name__)

T = TypeVar("T")


# --- the API's models ---------------------------------------------------------------------------------------


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("text is empty")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:  # JSON's "\ud800" escapes decode to characters that are not text
        raise ValueError(f"text is not valid Unicode (a lone surrogate at character {error.start})") from None
    return text


Text = Annotated[str, AfterValidator(_not_blank)]


class ClassifyRequest(BaseModel):
    """One text or a list of texts to classify; give exactly one of `text` and `texts`."""

    model_config = ConfigDict(extra="forbid")

    text: Text | None = Field(None, description="A single text.")
    texts: list[Text] | None = Field(None, min_length=1, description="Several texts, answered in order.")
    top: int = Field(3, ge=0, strict=True, description="How many of the most probable labels to return per text.")

    @model_validator(mode="after")
    def _exactly_one(self) -> ClassifyRequest:
        if (self.text is None) == (self.texts is None):
            raise ValueError("give exactly one of 'text' (a string) or 'texts' (a list of strings)")
        return self

    @property
    def all_texts(self) -> list[str]:
        return [self.text] if self.text is not None else self.texts


class LabelProbability(BaseModel):
    label: str
    probability: float


class Answer(BaseModel):
    """One text's answer: the fields of `labelcascade.Prediction`, with the `top` labels for its probabilities."""

    label: str | None = Field(description="The answer; null when the cascade abstained or a multi-label answer is empty.")
    labels: list[str] = Field(description="All labels answered (one for single-label tasks, any number for multi-label).")
    confidence: float = Field(description="Probability of the answer (multi-label: of the least sure label answered).")
    route: Route = Field(description="Who answered: fallback, llm, degraded (the LLM failed; fallback answer) or abstain.")
    top: list[LabelProbability] = Field(description="The most probable labels, most probable first.")
    evidence: list[int] = Field(description="Ids of the stored examples shown to the LLM.")
    latency_ms: float = Field(description="The classifier's time spent on this text, in milliseconds.")

    @classmethod
    def of(cls, prediction: Prediction, top: int) -> Answer:
        return cls(
            label=prediction.label,
            labels=prediction.labels,
            confidence=prediction.confidence,
            route=prediction.route,
            top=[LabelProbability(label=label, probability=p) for label, p in prediction.top(top)],
            evidence=prediction.evidence,
            latency_ms=prediction.latency_ms,
        )


class ClassifyResponse(BaseModel):
    answers: list[Answer] = Field(description="One answer per text, in the order given.")
    latency_ms: float = Field(description="Wall time of the request in the service, waiting for its batch included.")


class FeedbackRequest(BaseModel):
    """A person's label for a text, e.g. a corrected answer; give exactly one of `label` and `labels`."""

    model_config = ConfigDict(extra="forbid")

    text: Text
    label: str | None = Field(None, description="The right label.")
    labels: list[str] | None = Field(None, min_length=1, description="The right labels (multi-label tasks).")
    retrain: bool = Field(False, strict=True, description="Start retraining the fallback on every stored example.")

    @model_validator(mode="after")
    def _exactly_one(self) -> FeedbackRequest:
        if (self.label is None) == (self.labels is None):
            raise ValueError("give exactly one of 'label' (a string) or 'labels' (a list of strings)")
        return self

    @property
    def all_labels(self) -> list[str]:
        return [self.label] if self.label is not None else self.labels


class FeedbackResponse(BaseModel):
    id: int = Field(description="The stored example's id; a text already stored keeps its id and takes these labels.")
    labels: list[str]
    source: Source = Field(description="Always `review`: a person's label, which outranks the LLM's (not gold ones).")
    retraining: bool = Field(description="A retrain that includes this feedback has started (or will start when the "
                             "one running ends); answers use the new model once `GET /v1/task` shows a new `fallback`.")


class RetrainRequest(BaseModel):
    """Retrain the fallback on every stored example; with `body`, tune the workspace's tuned body again first."""

    model_config = ConfigDict(extra="forbid")

    body: bool = Field(False, strict=True, description="Tune the workspace's tuned body again first, on every stored "
                       "example, gold and LLM-labelled (minutes; workspaces created with embedder 'tuned').")
    tuning_seconds: float | None = Field(
        None, gt=0, strict=True, allow_inf_nan=False,
        description="With `body`: the most seconds the tuning may take (null: as the workspace's creation planned it).")

    @model_validator(mode="after")
    def _seconds_need_body(self) -> RetrainRequest:
        if self.tuning_seconds is not None and not self.body:
            raise ValueError("'tuning_seconds' limits a body retrain: give it with \"body\": true")
        return self


class RetrainResponse(BaseModel):
    retraining: bool = Field(description="A retrain has started (or will start when the one running ends); answers "
                             "use the new model once `GET /v1/task` shows a new `fallback`.")
    body: bool = Field(description="It tunes the body again first; `GET /v1/task` shows a new `embedder` after it.")


class BodyTuning(BaseModel):
    """How far a body retrain's tuning has got."""

    pairs_trained: int
    pairs_planned: int = Field(description="The pairs its plan holds; the time limit may stop it sooner.")


class LabelInfo(BaseModel):
    name: str
    description: str


class TaskInfo(BaseModel):
    name: str
    instructions: str
    labels: list[LabelInfo]
    multi_label: bool
    allow_abstain: bool
    policy: Policy = Field(description="The cascade's current thresholds and LLM settings.")
    fallback: str = Field(description="Fingerprint of the fallback model answering now; it changes when a retrain ends.")
    embedder: str = Field(description="Id of the embedder the fallback reads; it changes when a body retrain ends.")
    retraining: bool = Field(description="Whether a retrain is running (or asked for) in the background.")
    body_tuning: BodyTuning | None = Field(None, description="While a body retrain tunes the body: how far it is.")


class Health(BaseModel):
    status: Literal["ok"] = "ok"


# --- the one worker -----------------------------------------------------------------------------------------


@dataclass
class _Waiting:
    """A classify request in the queue: its texts and where its predictions go."""

    texts: list[str]
    predictions: asyncio.Future[list[Prediction]]


class SessionWorker:
    """Runs every call into the session on one thread, joins waiting classify requests into one call, and retrains
    the fallback on a thread of its own (see the module docstring)."""

    def __init__(self, session: Session, *, max_batch: int, batch_texts: Histogram):
        self.session = session
        self.max_batch = max_batch
        self._batch_texts = batch_texts
        self._executor: ThreadPoolExecutor | None = None
        self._trainer: ThreadPoolExecutor | None = None
        self._queue: asyncio.Queue[_Waiting] | None = None
        self._retraining: asyncio.Task | None = None
        self._retrain_again = False
        self._held: _Waiting | None = None  # the request that did not fit in the previous batch
        self._next: list[_Waiting] | None = None  # the next batch, when its texts were sent to the embedder ahead
        self._busy = False  # a batch is being answered
        embedder = getattr(session, "embedder", None)
        self._ahead_embedder = embedder if isinstance(embedder, EmbedderProcess) else None
        self._started_embedder: EmbedderProcess | None = None  # on a new body, by this worker, which stops it
        self._fitting: Retraining | None = None  # the retrain being fitted on the training thread

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The worker thread, the training thread and the batching loop, for the lifetime of the app."""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="labelcascade-classifier")
        self._trainer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="labelcascade-retrain")
        self._queue = asyncio.Queue()
        auto_retrain, self.session.auto_retrain = self.session.auto_retrain, False
        self._notify_idle(self._ahead_embedder, asyncio.get_running_loop())
        batching = asyncio.create_task(self._batch_forever())
        try:
            yield
        finally:
            batching.cancel()
            if self._retraining is not None:
                self._retraining.cancel()  # the old model stays; what it did not learn stays pending
            await asyncio.gather(*(task for task in (batching, self._retraining) if task is not None), return_exceptions=True)
            self._trainer.shutdown(wait=True)
            self._executor.shutdown(wait=True)
            self.session.auto_retrain = auto_retrain
            if self._ahead_embedder is not None:
                self._ahead_embedder.on_idle = None
            if self._started_embedder is not None:
                self._started_embedder.close()

    def _notify_idle(self, embedder: EmbedderProcess | None, loop: asyncio.AbstractEventLoop) -> None:
        """Have `embedder` say when its children are done with a batch's texts (see "Why the next batch is
        embedded ahead")."""
        if embedder is None:
            return

        def children_idle() -> None:  # on the thread that called `embed`
            with suppress(RuntimeError):  # the loop has closed: no next batch to embed
                loop.call_soon_threadsafe(self._embed_ahead)

        embedder.on_idle = children_idle

    @property
    def retraining(self) -> bool:
        return self._retraining is not None and not self._retraining.done()

    @property
    def body_tuning(self) -> BodyTuning | None:
        """How far the running body retrain's tuning has got, while it tunes."""
        pairs = getattr(self._fitting, "pairs", None)
        if pairs is None or self._fitting.model is not None:
            return None
        return BodyTuning(pairs_trained=pairs[0], pairs_planned=pairs[1])

    def retrain(self) -> None:
        """Start a retrain in the background, or ask for one more after the one running."""
        if self.retraining:
            self._retrain_again = True
        else:
            self._retraining = asyncio.create_task(self._retrain())

    async def retrain_body(self, tuning_seconds: float | None) -> None:
        """Begin a body retrain now and go on with it in the background (see the module docstring); HTTPException
        409 while a retrain runs or the workspace's body lock is held elsewhere, 422 for a workspace that has no
        tuned body."""
        busy = "a retrain is running; ask again once GET /v1/task says \"retraining\": false"
        if self.retraining:
            raise HTTPException(409, detail=busy)
        try:
            retraining = await self.call(lambda: self.session.begin_retrain(body=True, tuning_seconds=tuning_seconds),
                                         guarded=False)
        except WorkspaceError as error:
            raise HTTPException(409, detail=str(error)) from None
        except ValueError as error:
            raise _invalid("body", str(error)) from None
        if self.retraining:  # one started while this one began
            retraining.abandon()
            raise HTTPException(409, detail=busy)
        self._retraining = asyncio.create_task(self._retrain(retraining))

    async def _retrain(self, first: Retraining | None = None) -> None:
        """Retrains one after another while more are asked for: `first` (begun already), then head-only ones."""
        loop = asyncio.get_running_loop()
        while True:
            self._retrain_again = False
            retraining, first = first, None
            try:
                if retraining is None:
                    retraining = await self.call(self.session.begin_retrain)
                self._fitting = retraining
                fitted = await loop.run_in_executor(self._trainer, retraining.fit)
                embedder = await loop.run_in_executor(self._trainer, self._embedder_for, fitted)
                await self.call(lambda: self._swap_in(fitted, embedder, loop))
            except Exception:  # already logged by _guarded, or the fit's own error (never a cancellation)
                logger.exception("a background retrain failed; the previous fallback still answers")
            finally:  # failed, cancelled (a fit still tuning stops) or swapped in (then there is nothing to let go)
                self._fitting = None
                if retraining is not None:
                    retraining.abandon()
            if not self._retrain_again:
                return

    def _embedder_for(self, fitted: Retraining) -> EmbedderProcess | None:
        """Child processes on a fitted body retrain's new body, when the session embeds in child processes."""
        if not isinstance(fitted, BodyRetraining) or self._ahead_embedder is None:
            return None
        return EmbedderProcess(fitted.embedder_spec, workers=self._ahead_embedder.workers)

    def _swap_in(self, fitted: Retraining, embedder: EmbedderProcess | None, loop: asyncio.AbstractEventLoop) -> None:
        """On the worker thread: the fitted model (and body) swapped in, and the session switched to `embedder`,
        the new body's child processes, when there are some; the old body's are stopped."""
        try:
            self.session.end_retrain(fitted)
        except BaseException:
            if embedder is not None:
                embedder.close()
            raise
        if embedder is None:
            return
        old, self._ahead_embedder = self._ahead_embedder, embedder
        self.session.embedder = embedder
        self._notify_idle(embedder, loop)
        old.on_idle = None
        old.close()  # the one `serve` started, or this worker's last: a second close (by `serve`) does nothing
        self._started_embedder = embedder

    async def current(self, function: Callable[[], T]) -> T:
        """`call(function)` on the workspace as saved now, for a function that reads the session's properties (its
        methods read the workspace again themselves: see "Why the service reads the workspace again")."""

        def run() -> T:
            self.session.refresh()
            return function()

        return await self.call(run)

    async def call(self, function: Callable[[], T], *, guarded: bool = True) -> T:
        """Run `function` (which may touch the classifier) on the worker thread, in turn with everything else;
        `guarded`: its errors become 500s that name them (`_guarded`), else they come back as they are."""
        run = _guarded(function) if guarded else function
        return await asyncio.get_running_loop().run_in_executor(self._executor, run)

    async def classify(self, texts: list[str]) -> list[Prediction]:
        """Predictions for `texts`, classified together with whatever other requests are waiting."""
        waiting = _Waiting(texts, asyncio.get_running_loop().create_future())
        self._queue.put_nowait(waiting)
        return await waiting.predictions

    async def _batch_forever(self) -> None:
        while True:
            batch = self._next or self._joined(self._held or await self._queue.get())
            self._next = None
            self._busy = True
            try:
                await self._answer([waiting for waiting in batch if not waiting.predictions.cancelled()])
            finally:
                self._busy = False

    def _joined(self, first: _Waiting) -> list[_Waiting]:
        """`first` and the requests waiting behind it, up to `max_batch` texts (the one that does not fit is held
        for the next batch)."""
        self._held = None
        batch, size = [first], len(first.texts)
        while not self._queue.empty():
            waiting = self._queue.get_nowait()
            if size + len(waiting.texts) > self.max_batch:
                self._held = waiting
                break
            batch.append(waiting)
            size += len(waiting.texts)
        return batch

    def _embed_ahead(self) -> None:
        """The embedder's children finished the running batch's texts: make the next batch of the requests waiting
        now and start embedding it (see "Why the next batch is embedded ahead")."""
        if not self._busy or self._next is not None or (self._held is None and self._queue.empty()):
            return
        self._next = self._joined(self._held or self._queue.get_nowait())
        self._ahead_embedder.embed_soon([text for waiting in self._next for text in waiting.texts])

    async def _answer(self, batch: list[_Waiting]) -> None:
        if not batch:
            return
        texts = [text for waiting in batch for text in waiting.texts]
        self._batch_texts.observe(len(texts))
        try:
            predictions, due = await self.call(lambda: (self.session.classify(texts), self.session.retrain_due))
        except HTTPException as error:
            for waiting in batch:
                if not waiting.predictions.done():
                    waiting.predictions.set_exception(error)
            return
        start = 0
        for waiting in batch:
            if not waiting.predictions.done():
                waiting.predictions.set_result(predictions[start : start + len(waiting.texts)])
            start += len(waiting.texts)
        if due and not self.retraining:
            self.retrain()


def _guarded(function: Callable[[], T]) -> Callable[[], T]:
    """`function`, with any error it raises logged with its traceback and turned into a 500 that names it."""

    def run() -> T:
        try:
            return function()
        except HTTPException:
            raise  # an answer the function chose (a refusal), not a failure
        except (EmbedderMismatchError, BodyChangedError) as error:  # another process retrained the body
            logger.error(f"the workspace changed under the service: {error}")
            restart = ("Restart the service to serve the workspace as it is now (a body retrain through the service "
                       "itself, POST /v1/retrain, needs none)")
            raise HTTPException(503, detail=f"{error}. {restart}") from None
        except Exception as error:
            logger.exception("the classifier failed")
            raise HTTPException(500, detail=f"the classifier failed: {type(error).__name__}: {error}") from None

    return run


# --- metrics ------------------------------------------------------------------------------------------------


class Metrics:
    """The service's Prometheus instruments, in a registry of its own (so several apps can live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "labelcascade_http_requests", "HTTP requests answered, by endpoint and status code.",
            ["endpoint", "status"], registry=self.registry,
        )
        self.latency = Histogram(
            "labelcascade_http_request_duration_seconds", "Time to answer an HTTP request, by endpoint.",
            ["endpoint"], registry=self.registry,
        )
        self.answers = Counter(
            "labelcascade_answers", "Texts answered, by the route that answered them.", ["route"], registry=self.registry
        )
        self.batch_texts = Histogram(
            "labelcascade_classify_batch_texts", "Texts per classifier call (several requests joined into one).",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=self.registry,
        )
        for route in Route:
            self.answers.labels(route.value)

    def observe(self, scope: dict, status: int, seconds: float) -> None:
        route = scope.get("route")
        endpoint = route.path if route is not None else "unmatched"  # unknown paths must not grow the label set
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def exposition(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class MeasuredRequests:
    """Counts and times every HTTP request for /metrics. A plain ASGI middleware: Starlette's `@app.middleware`
    (BaseHTTPMiddleware) wraps each request and response in extra tasks and streams, a cost the event loop paid on
    every request, in turn with parsing the next ones."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def sending(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.observe(scope, status, time.perf_counter() - start)


# --- the app ------------------------------------------------------------------------------------------------


def create_app(
    session: Session,
    *,
    api_key: str | None = None,
    max_texts: int = 256,
    max_text_chars: int = 4_000,
    max_body_bytes: int = 1_000_000,
    max_feedback_per_minute: int = 60,
) -> FastAPI:
    """The HTTP app over `session`, which stays yours to close. With `api_key`, every endpoint but /healthz (and
    the /docs page) needs `Authorization: Bearer <key>` or `X-API-Key: <key>`. `max_texts` caps the texts per
    request (and per session call), `max_text_chars` the length of one text, `max_body_bytes` the request body,
    `max_feedback_per_minute` the feedback requests taken over any 60 seconds."""
    metrics = Metrics()
    feedback_times: deque[float] = deque()  # when feedback requests came, over the last minute
    worker = SessionWorker(session, max_batch=max_texts, batch_texts=metrics.batch_texts)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with worker.running():
            yield

    app = FastAPIOffline(  # /docs and /redoc with their scripts served from the package: they render offline
        title="labelcascade",
        version=__version__,
        summary="Classify texts with a cascade: an embedding + SVM fallback, a local LLM when it is unsure.",
        lifespan=lifespan,
        max_body_size=max_body_bytes,
    )

    app.add_middleware(MeasuredRequests, metrics=metrics)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, error: RequestValidationError) -> JSONResponse:
        """FastAPI's 422, except that an input JSON cannot carry back (a lone surrogate) is left out, not a 500."""
        return JSONResponse({"detail": [_encodable(detail) for detail in jsonable_encoder(error.errors())]}, status_code=422)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, error: Exception) -> JSONResponse:
        logger.error("unexpected error", exc_info=error)
        return JSONResponse({"detail": "internal error; see the service's log"}, status_code=500)

    @app.get("/healthz", tags=["service"])
    async def healthz() -> Health:
        """The service is up. Needs no API key and does not wait for the classifier."""
        return Health()

    api = APIRouter(dependencies=[Depends(_key_check(api_key))] if api_key is not None else [])

    @api.post("/v1/classify", tags=["classify"], responses={200: {"headers": ANSWER_HEADERS}})
    async def classify(request: ClassifyRequest, response: Response) -> ClassifyResponse:
        """Classify one text or a list of texts; requests that arrive together are classified in one batch. The
        answers' labels, routes and confidences are also in response headers, one value per text in order."""
        start = time.perf_counter()
        texts = request.all_texts
        field = "text" if request.text is not None else "texts"
        if len(texts) > max_texts:
            raise _invalid(field, f"{len(texts)} texts; at most {max_texts} per request")
        for i, text in enumerate(texts):
            if len(text) > max_text_chars:
                where = field if request.text is not None else f"texts[{i}]"
                raise _invalid(where, f"{where} has {len(text)} characters; at most {max_text_chars}")
        predictions = await worker.classify(texts)
        for prediction in predictions:
            metrics.answers.labels(prediction.route.value).inc()
        response.headers.update(answer_headers(predictions))
        return ClassifyResponse(
            answers=[Answer.of(prediction, request.top) for prediction in predictions],
            latency_ms=(time.perf_counter() - start) * 1000,
        )

    @api.post("/v1/feedback", tags=["learn"])
    async def feedback(request: FeedbackRequest) -> FeedbackResponse:
        """Store a person's label for a text as a `review` example (it outranks LLM labels of the same text, never
        gold ones). The fallback learns from it at its next retrain; `"retrain": true` starts one in the background."""
        task = await worker.current(lambda: session.task)
        labels = request.all_labels
        field = "label" if request.label is not None else "labels"
        for label in labels:
            if label not in task.label_names:
                raise _invalid(field, f"unknown label {label!r}; the task {task.name!r} has labels {task.label_names}")
        if len(labels) > 1 and not task.multi_label:
            raise _invalid(field, f"{len(labels)} labels given but the task {task.name!r} is single-label")
        if len(text := request.text) > max_text_chars:
            raise _invalid("text", f"text has {len(text)} characters; at most {max_text_chars}")
        now = time.monotonic()
        while feedback_times and now - feedback_times[0] >= 60:
            feedback_times.popleft()
        if len(feedback_times) >= max_feedback_per_minute:
            wait = max(1, int(60 - (now - feedback_times[0])) + 1)
            raise HTTPException(429, detail=f"at most {max_feedback_per_minute} feedback requests a minute; try again "
                                            f"in {wait} s", headers={"Retry-After": str(wait)})
        feedback_times.append(now)

        def store() -> int:
            stored = session.store.find([text]).get(text)
            if stored is not None and stored.source is Source.GOLD and set(stored.labels) != set(labels):
                raise HTTPException(409, detail=(
                    f"this text has the gold label {', '.join(stored.labels)}, which feedback does not overrule; a "
                    "person with the workspace corrects it with `labelcascade add WORKSPACE FILE --review`"))
            [example_id] = session.add_examples([text], [labels], source=Source.REVIEW)  # durable on return
            return example_id

        example_id = await worker.call(store)
        if request.retrain:
            worker.retrain()
        return FeedbackResponse(id=example_id, labels=labels, source=Source.REVIEW, retraining=worker.retraining)

    @api.post("/v1/retrain", tags=["learn"], status_code=202)
    async def retrain(request: RetrainRequest | None = None) -> RetrainResponse:
        """Retrain the fallback on every stored example in the background, as feedback's `"retrain": true` does;
        with `"body": true`, tune the workspace's tuned body again first (minutes; answers go on with the old body
        and model until the swap). A body retrain is refused with 409 while any retrain runs."""
        if request is not None and request.body:
            await worker.retrain_body(request.tuning_seconds)
        else:
            worker.retrain()
        return RetrainResponse(retraining=worker.retraining, body=request is not None and request.body)

    @api.get("/v1/task", tags=["task"])
    async def task_info() -> TaskInfo:
        """The task's labels and answer shape, and the thresholds the cascade routes by."""
        task, policy, fallback, embedder = await worker.current(
            lambda: (session.task, session.policy, session.cascade.fallback.fingerprint(), session.embedder.id))
        return TaskInfo(
            name=task.name,
            instructions=task.instructions,
            labels=[LabelInfo(name=label.name, description=label.description) for label in task.labels],
            multi_label=task.multi_label,
            allow_abstain=task.allow_abstain,
            policy=policy,
            fallback=fallback,
            embedder=embedder,
            retraining=worker.retraining,
            body_tuning=worker.body_tuning,
        )

    @api.get("/metrics", tags=["service"], response_class=Response)
    async def prometheus_metrics() -> Response:
        """Prometheus text format: requests by endpoint and status, answers by route, latencies, batch sizes."""
        return metrics.exposition()

    app.include_router(api)
    return app


# What a gateway or an agent framework routes on, readable without parsing the body: one value per text, in the
# request's order, joined by ", " (the list syntax of HTTP fields). A label is percent-encoded UTF-8 (a header is
# Latin-1, and a label may hold commas or any script); an abstention's label is empty.
ANSWER_HEADERS = {
    "X-Labelcascade-Label": {"description": "Each text's label (multi-label: its labels joined by '|'), "
                                            "percent-encoded UTF-8; empty when it has none.",
                             "schema": {"type": "string"}},
    "X-Labelcascade-Route": {"description": "Each text's route: fallback, llm, degraded or abstain.",
                             "schema": {"type": "string"}},
    "X-Labelcascade-Confidence": {"description": "Each text's confidence, 4 decimals.", "schema": {"type": "string"}},
}


def answer_headers(predictions: list[Prediction]) -> dict[str, str]:
    multi = [p.labels for p in predictions]
    return {
        "X-Labelcascade-Label": ", ".join(quote("|".join(labels), safe="") for labels in multi),
        "X-Labelcascade-Route": ", ".join(p.route.value for p in predictions),
        "X-Labelcascade-Confidence": ", ".join(f"{p.confidence:.4f}" for p in predictions),
    }


def _key_check(api_key: str) -> Callable[..., None]:
    """A dependency that accepts `Authorization: Bearer <api_key>` or `X-API-Key: <api_key>` and nothing else."""
    expected = api_key.encode()

    def check(
        bearer: Annotated[HTTPAuthorizationCredentials | None, Security(HTTPBearer(auto_error=False))],
        header: Annotated[str | None, Security(APIKeyHeader(name="X-API-Key", auto_error=False))],
    ) -> None:
        given = bearer.credentials if bearer is not None else header
        if given is None or not secrets.compare_digest(given.encode(), expected):
            raise HTTPException(
                401,
                detail="missing or wrong API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return check


def _encodable(detail: dict) -> dict:
    """`detail` with its echoed input (and the context that repeats it) dropped when JSON cannot carry them back:
    a lone surrogate, or NaN and Infinity, which Python's JSON parser reads but a JSON response cannot hold."""
    try:
        json.dumps(detail, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except ValueError:  # UnicodeEncodeError is one too
        return {key: value for key, value in detail.items() if key not in ("input", "ctx")}
    return detail


def _invalid(field: str, message: str) -> RequestValidationError:
    """A 422 in FastAPI's own shape, for limits that depend on the app's settings or the task."""
    return RequestValidationError([{"type": "value_error", "loc": ("body", field), "msg": message, "input": None}])


def serve(
    workspace: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    engine: str | None = "saved",
    max_texts: int = 256,
    max_text_chars: int = 4_000,
    max_body_bytes: int = 1_000_000,
    max_feedback_per_minute: int = 60,
    allow_no_key: bool = False,
    embedder_workers: int | None = None,
) -> None:
    """Open `workspace` and serve it over HTTP until interrupted. `engine` is the workspace's saved LLM engine
    ("saved"), another engine spec, or None for the fallback alone. A `host` other than this machine's loopback
    needs an `api_key`, or `allow_no_key=True` (ValueError otherwise). The embedder runs in `embedder_workers`
    processes of one core each (None: one per core, at most 4). The other options are `create_app`'s."""
    if api_key is None and not allow_no_key and not is_loopback(host):
        raise ValueError(
            f"serving on {host} without an API key would let anyone who can reach it use it: give an API key "
            "(--api-key KEY or LABELCASCADE_API_KEY), or --allow-no-key if something in front of it checks callers"
        )
    with sigterm_unwinds():  # see "Why `serve` unwinds on SIGTERM"
        _serve(workspace, host=host, port=port, api_key=api_key, engine=engine, max_texts=max_texts,
               max_text_chars=max_text_chars, max_body_bytes=max_body_bytes,
               max_feedback_per_minute=max_feedback_per_minute, embedder_workers=embedder_workers)


def _serve(workspace: str | Path, *, host: str, port: int, api_key: str | None, engine: str | None, max_texts: int,
           max_text_chars: int, max_body_bytes: int, max_feedback_per_minute: int,
           embedder_workers: int | None) -> None:
    # see "Why the embedder has processes of its own"
    embedder = EmbedderProcess(Workspace.open(workspace).embedder_spec, workers=embedder_workers)
    try:
        session = Session.open(workspace, engine=engine, embedder=embedder)
        try:
            if session.asks_uncalibrated_llm:
                logger.warning(
                    "%s is not calibrated, so the LLM answers every text the fallback is less than %.0f%% sure of "
                    "(and the request waits for it), whether or not it does better than the fallback on this task; "
                    "calibrate the workspace on labelled dev texts (`labelcascade calibrate`, `Session.calibrate`) to "
                    "choose when to ask it", workspace, 100 * session.policy.accept_threshold)
            app = create_app(
                session, api_key=api_key, max_texts=max_texts, max_text_chars=max_text_chars,
                max_body_bytes=max_body_bytes, max_feedback_per_minute=max_feedback_per_minute,
            )
            with threadpool_limits(limits=1, user_api="blas"):  # see "Why the service's own numpy runs on one thread"
                uvicorn.run(app, host=host, port=port)
        finally:
            session.close()
    finally:
        embedder.close()


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only: 'localhost' or a loopback address (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False
