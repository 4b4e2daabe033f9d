"""Labelling jobs on Ray Data: the same job as `jobs.LabelJob`, its rows classified by the workers of a Ray cluster.

The cascade runs as one streaming Ray Data pipeline of two actor pools:

    rows -> fallback stage (embed + SVM; every row)  ->  LLM stage (only the rows the fallback is unsure of)  -> out

Each actor opens its own copy of the workspace, shipped once through Ray's object store as a tar archive of the
folder (its answer cache and lock left out), not per batch; the embedder and engine come from the worker's own
install of labelcascade (the packaged models) or the engine spec (a vLLM server, a GGUF path on every worker).
The fallback stage hands each row's vector and its sure/unsure flag on; the LLM stage sends the unsure rows of a
batch to its engine with those vectors (nothing embedded twice) and lets the sure rows pass untouched. It is one
pipeline rather than a filter and a union because a lazy dataset read by two branches would run the fallback stage
twice, or hold every row's answer in memory between them.

Why an actor pool of our own engines rather than `ray.data.llm`'s vLLM processor: the LLM stage is the cascade's
own (`Cascade.run` on the unsure rows: retrieval of few-shot examples from the workspace's store, candidate
narrowing, the prompt layout, each label's exact log-probability from `Engine.score`, the calibrated temperature,
label offsets and pooling), the same code for every engine. Ray 2.60's vLLM stage does return `prompt_logprobs`,
so a label could be scored there as the prompt followed by the label; it would duplicate that code for one engine.
On a GPU host an actor with the `vllm-offline:` engine per GPU (`llm_gpus=1`) runs the same scoring in vLLM, with
its prefix cache; on CPU hosts, llama.cpp, on as many threads as the CPUs its actor reserves (`llm_cpus`): Ray places
actors by what they reserve, and llama.cpp threads that outnumber the cores slow each other down many times over.
(Not run on a GPU here: no GPU was lent to the sessions that built it.)

The file job (`RayLabelJob`) keeps everything else of the single-process job, on the driver: the file is read and
checked by the same reader (a bad row stops the job before any work, named by its line), the job's state file
commits each batch of answers as it comes back (a killed job resumes without relabelling a row; every row exactly
once, written in input order), the answer cache is read before rows are sent and written as answers arrive, the
`max_llm_calls` budget is held by one Ray actor that every LLM worker takes its share from.

Learning happens between passes, not during one: the rows go out in passes of `pass_rows`; a pass is answered by
workers holding the workspace as it was when the pass began, then its confident LLM answers are stored in the
workspace and the fallback retrained when due (`Session.learn`, as `classify` would have done), and the next pass
(or a resumed job) ships the workspace again. Within a pass nothing is learned: a worker's answers do not change
another's model or retrieval.
"""

from __future__ import annotations

import io
import os
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from labelcascade.agent import LLMProgress
from labelcascade.agent.engines import Engine, load_engine
from labelcascade.answer_cache import CACHE_FILE
from labelcascade.jobs import JobBar, LabelJob, answer_columns
from labelcascade.records import Prediction, Route
from labelcascade.session import Session, checked_texts
from labelcascade.tables import Row
from labelcascade.workspace import LOCK_FILES

# Columns the pipeline adds while it works; none is left in what `label_dataset` returns.
ROW = "__labelcascade_row"
ANSWER = "__labelcascade_answer"  # the Prediction as JSON
VECTOR = "__labelcascade_vector"
UNSURE = "__labelcascade_unsure"
ASKED = "__labelcascade_asked"  # the LLM answered this row (not degraded): it counts against the budget
TEXT = "text"

LOCAL = "local"  # `address` that starts a Ray instance on this machine for the job


def workspace_archive(session: Session) -> bytes:
    """The workspace folder as a tar archive, made durable first; its answer cache (the driver's) and lock file are
    left out. Workers unpack it into a folder of their own."""
    session.store.save()
    skipped = {*LOCK_FILES, CACHE_FILE, CACHE_FILE + "-wal", CACHE_FILE + "-shm", CACHE_FILE + "-journal"}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for path in sorted(session.path.rglob("*")):
            relative = path.relative_to(session.path)
            if relative.parts[0] in skipped or path.is_symlink() or not path.is_file():
                continue
            archive.add(path, arcname=str(relative), recursive=False)
    return buffer.getvalue()


def open_archive(archive: bytes, engine: str | Engine | None) -> tuple[Session, tempfile.TemporaryDirectory]:
    """A session on a private copy of a shipped workspace (unpacked with tarfile's `data` filter: no links out,
    no absolute paths); delete the folder after closing the session."""
    folder = tempfile.TemporaryDirectory(prefix="labelcascade-worker-")
    with tarfile.open(fileobj=io.BytesIO(archive)) as unpacked:
        unpacked.extractall(folder.name, filter="data")
    return Session.open(folder.name, engine=engine), folder


class FallbackStage:
    """Ray Data actor: embeds a batch, answers it with the fallback, and marks the rows the LLM should see."""

    def __init__(self, archive: list, text_column: str, asks_llm: bool):
        import ray

        self.session, self._folder = open_archive(ray.get(archive[0]), engine=None)
        self.text_column, self.asks_llm = text_column, asks_llm

    def __call__(self, table):
        import pyarrow as pa

        texts = checked_texts(table.column(self.text_column).to_pylist())
        cascade = self.session.cascade
        vectors = self.session.embedder.embed(texts)
        answers = cascade.run(texts, vectors=vectors, llm_limit=0, learn=False)
        unsure = ~cascade.policy.accepts(answers.certainty) if self.asks_llm else np.zeros(len(texts), dtype=bool)
        flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
        return (table.append_column(ANSWER, pa.array([p.model_dump_json() for p in answers.predictions]))
                .append_column(VECTOR, pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]))
                .append_column(UNSURE, pa.array(unsure.tolist(), type=pa.bool_())))


class LLMStage:
    """Ray Data actor: sends a batch's unsure rows to its engine, within the job's shared budget; the other rows
    pass through as the fallback answered them."""

    def __init__(self, archive: list, text_column: str, engine: str | None, budget, cpus: int = 1):
        import ray

        if engine is not None and engine.startswith("llamacpp:"):  # its threads on the CPUs this actor reserved
            try:
                engine = load_engine(engine, n_threads=cpus)
            except Exception:  # noqa: BLE001 - left to the session, which degrades as one process would (EngineSlot)
                pass
        self.session, self._folder = open_archive(ray.get(archive[0]), engine=engine)
        self.text_column, self.budget = text_column, budget

    def __call__(self, table):
        import pyarrow as pa
        import ray

        unsure = np.flatnonzero(table.column(UNSURE).to_numpy(zero_copy_only=False))
        answers = table.column(ANSWER).to_pylist()
        asked = np.zeros(table.num_rows, dtype=bool)
        granted = 0 if not len(unsure) else len(unsure) if self.budget is None else ray.get(
            self.budget.take.remote(len(unsure)))
        if granted:
            texts = table.column(self.text_column).to_pylist()
            vectors = np.asarray(table.column(VECTOR).combine_chunks().flatten(), dtype=np.float32).reshape(
                table.num_rows, -1)
            sent: list[int] = []

            def arrived(step: LLMProgress) -> None:
                sent.extend(i for i, p in zip(step.indices, step.predictions, strict=True)
                            if p.route is not Route.DEGRADED)

            chosen = self.session.cascade.run([texts[i] for i in unsure], vectors=vectors[unsure], llm_limit=granted,
                                              learn=False, on_llm=arrived).predictions
            for i, prediction in zip(unsure, chosen, strict=True):
                answers[i] = prediction.model_dump_json()
            asked[unsure[sent]] = True
            if self.budget is not None and len(sent) < granted:
                self.budget.give_back.remote(granted - len(sent))  # degraded texts cost the budget nothing
        return (table.drop_columns([VECTOR, UNSURE]).set_column(table.schema.get_field_index(ANSWER), ANSWER,
                                                                  pa.array(answers))
                .append_column(ASKED, pa.array(asked.tolist(), type=pa.bool_())))


class LLMBudget:
    """The job's `max_llm_calls` left, as one Ray actor: LLM workers take their share before asking, and give back
    what they did not spend. None: no limit."""

    def __init__(self, left: int | None):
        self.left = left

    def take(self, wanted: int) -> int:
        if self.left is None:
            return wanted
        granted = min(wanted, self.left)
        self.left -= granted
        return granted

    def give_back(self, unspent: int) -> None:
        if self.left is not None:
            self.left += unspent


def cascade_pipeline(dataset, session: Session, *, text_column: str = TEXT, max_llm_calls: int | None = None,
                     batch_size: int = 64, fallback_workers: int = 1, llm_workers: int = 1, llm_gpus: float = 0,
                     llm_cpus: int = 1):
    """`dataset` with the internal answer columns added (ANSWER: each row's Prediction as JSON; ASKED: whether the
    LLM answered it), lazily: the two actor pools described in the module docstring. The LLM workers load the
    engine `session` asks (`Session.engine_spec`); none when it has none."""
    import ray
    from ray.data import ActorPoolStrategy  # `compute=`: map_batches' `concurrency=` is deprecated since Ray 2.51

    archive = [ray.put(workspace_archive(session))]  # in a list: Ray hands the reference itself to the actors
    engine = session.engine_spec
    asks_llm = engine is not None and session.policy.asks_llm
    answered = dataset.map_batches(
        FallbackStage, fn_constructor_kwargs={"archive": archive, "text_column": text_column, "asks_llm": asks_llm},
        batch_size=batch_size, batch_format="pyarrow", compute=ActorPoolStrategy(size=fallback_workers), num_cpus=1)
    if not asks_llm:
        return answered.map_batches(_no_llm, batch_format="pyarrow", batch_size=None, zero_copy_batch=True)
    budget = ray.remote(LLMBudget).options(num_cpus=0).remote(max_llm_calls)
    return answered.map_batches(
        LLMStage, fn_constructor_kwargs={"archive": archive, "text_column": text_column, "engine": engine,
                                         "budget": budget, "cpus": llm_cpus},
        batch_size=batch_size, batch_format="pyarrow", compute=ActorPoolStrategy(size=llm_workers), num_cpus=llm_cpus,
        num_gpus=llm_gpus)


def _no_llm(table):
    """The fallback stage's output as the LLM stage leaves it when no LLM is asked."""
    import pyarrow as pa

    return table.drop_columns([VECTOR, UNSURE]).append_column(ASKED, pa.array([False] * table.num_rows))


def label_dataset(session: Session, dataset, *, text_column: str = TEXT, max_llm_calls: int | None = None,
                  top: int = 3, prefix: str = "", batch_size: int = 64, fallback_workers: int = 1,
                  llm_workers: int = 1, llm_gpus: float = 0, llm_cpus: int = 1):
    """A `ray.data.Dataset` labelled by `session`'s workspace and engine on the Ray cluster: `dataset`'s rows in
    their order (Ray Data's `preserve_order` is turned on) with the job's answer columns added (`label`,
    `confidence`, `route`, `top`, each name after `prefix`; a multi-label task's `label` is a list of labels). Lazy,
    as Ray datasets are: write or iterate it to run it. At most `max_llm_calls` rows are answered by the LLM, over
    all LLM workers.

    Nothing is learned and nothing is cached: for a resumable job that learns between passes, label a file with
    `RayLabelJob` (`labelcascade label --ray`)."""
    multi_label = session.task.multi_label
    answered = cascade_pipeline(dataset, session, text_column=text_column, max_llm_calls=max_llm_calls,
                                batch_size=batch_size, fallback_workers=fallback_workers, llm_workers=llm_workers,
                                llm_gpus=llm_gpus, llm_cpus=llm_cpus)

    def with_answers(table):
        import pyarrow as pa

        rows = [answer_columns(Prediction.model_validate_json(answer), multi_label=multi_label, top=top, prefix=prefix,
                               joined=False) for answer in table.column(ANSWER).to_pylist()]
        table = table.drop_columns([ANSWER, ASKED])
        for name in rows[0] if rows else ():
            table = table.append_column(name, pa.array([row[name] for row in rows]))
        return table

    labelled = answered.map_batches(with_answers, batch_format="pyarrow", batch_size=batch_size)
    labelled.context.execution_options.preserve_order = True  # each dataset runs with the context it was made with
    return labelled


@contextmanager
def ray_cluster(address: str | None) -> Iterator[None]:
    """Connect to the Ray cluster at `address` ("auto": the one this machine belongs to; "local": start one here for
    the job and stop it after), unless this process is connected already. Ray Data's own progress bars are off:
    the job shows its own."""
    import ray
    import ray.data

    started = False
    if not ray.is_initialized():
        options = dict(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        if address in (None, LOCAL):
            ray.init(num_cpus=max(os.cpu_count() or 1, 4), **options)
        else:
            ray.init(address=address, **options)
        started = True
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    try:
        yield
    finally:
        if started:
            ray.shutdown()


class RayLabelJob(LabelJob):
    """A `LabelJob` whose rows are classified by a Ray cluster (see the module docstring): same input checks, state,
    resume, answer cache, budget, output and review file as the single-process job."""

    def __init__(self, session: Session, source: str | Path, destination: str | Path, *, address: str | None = LOCAL,
                 fallback_workers: int = 1, llm_workers: int = 1, llm_gpus: float = 0, llm_cpus: int = 1,
                 pass_rows: int = 10_000, **options):
        """`address`: the Ray cluster ("local": one started here for the job; "auto"; "ray://host:10001").
        `fallback_workers`, `llm_workers`: actors in each pool (`llm_gpus` GPUs each: 1 for a vLLM engine per GPU;
        `llm_cpus` CPUs each, the threads of a llama.cpp engine).
        `pass_rows`: rows per pass; the workers' workspace is shipped again after each pass has been learned from.
        Other options as `LabelJob`."""
        super().__init__(session, source, destination, **options)
        for name, value in (("fallback_workers", fallback_workers), ("llm_workers", llm_workers),
                            ("llm_cpus", llm_cpus), ("pass_rows", pass_rows)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if llm_gpus < 0:
            raise ValueError(f"llm_gpus must be 0 or more, got {llm_gpus}")
        self.address = address
        self.fallback_workers, self.llm_workers, self.llm_gpus = fallback_workers, llm_workers, llm_gpus
        self.llm_cpus = llm_cpus
        self.pass_rows = pass_rows

    def _answered(self, done: set[int], llm_calls: int, bar: JobBar | None):
        with ray_cluster(self.address):
            window: list[tuple[int, Row]] = []
            for batch in self._pending_batches(done):
                window += batch
                if len(window) >= self.pass_rows:
                    for answered in self._pass(window, llm_calls):
                        llm_calls += answered[3]
                        yield answered
                    window = []
            if window:
                yield from self._pass(window, llm_calls)

    def _pass(self, rows: list[tuple[int, Row]], llm_calls: int):
        """Answer one pass's rows: cached answers first, the rest on the cluster; then learn from the pass."""
        import pyarrow as pa
        import ray.data

        texts = [row.text for _, row in rows]
        self.session.refresh()  # the workers get the workspace as saved now (another process may have changed it)
        version = self.session.answer_version() if self.cache is not None else ""
        hits = self.cache.get(texts, version) if self.cache is not None else {}
        found = sorted(hits)
        for start in range(0, len(found), self.batch_size):
            chunk = found[start:start + self.batch_size]
            yield [rows[i] for i in chunk], [hits[i] for i in chunk], [True] * len(chunk), 0
        misses = [i for i in range(len(rows)) if i not in hits]
        if not misses:
            return
        left = None if self.max_llm_calls is None else max(0, self.max_llm_calls - llm_calls)
        block = self.batch_size * 4  # blocks of whole batches (batches as in one process), several per worker
        tables = [pa.table({ROW: pa.array(misses[i:i + block], pa.int64()),
                            TEXT: pa.array([texts[j] for j in misses[i:i + block]], pa.string())})
                  for i in range(0, len(misses), block)]
        answered = cascade_pipeline(ray.data.from_arrow(tables), self.session, text_column=TEXT, max_llm_calls=left,
                                    batch_size=self.batch_size, fallback_workers=self.fallback_workers,
                                    llm_workers=self.llm_workers, llm_gpus=self.llm_gpus, llm_cpus=self.llm_cpus)
        learned: list[tuple[str, Prediction]] = []
        for table in answered.iter_batches(batch_size=self.batch_size, batch_format="pyarrow"):
            indices = table.column(ROW).to_pylist()
            predictions = [Prediction.model_validate_json(a) for a in table.column(ANSWER).to_pylist()]
            asked = table.column(ASKED).to_pylist()
            if self.cache is not None:
                self.cache.put([texts[i] for i in indices], predictions, version)
            learned += [(texts[i], p) for i, p in zip(indices, predictions, strict=True) if p.route is Route.LLM]
            yield [rows[i] for i in indices], predictions, [False] * len(indices), int(sum(asked))
        if learned:
            self.session.learn([text for text, _ in learned], [p for _, p in learned])
