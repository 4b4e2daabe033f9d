"""Labelling jobs: outputs, the LLM budget, the answer cache (LLM answers of a killed batch kept), the review file
and the plan, with the real CLI and the real embedded LLM. Every row exactly once through SIGKILLs at random points
is tests/reliability/test_job_kills.py."""

import csv
import fcntl
import json
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from labelcascade import Session
from labelcascade.agent import Policy
from labelcascade.answer_cache import CACHE_FILE
from labelcascade.jobs import STATE_SUFFIX, LabelJob, review_threshold
from labelcascade.retrieval import ExampleStore
from labelcascade.tables import InputError, read_rows
from labelcascade.task import Task

from .conftest import BANKING_TASK, banking_messages, few_shot, load_split, rows_done, rows_in, write_texts_jsonl

ROWS = 1200
BATCH = 16


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return write_texts_jsonl(tmp_path_factory.mktemp("input") / "messages.jsonl", load_split("banking77", "test")[:ROWS])



def test_outputs_in_every_format_keep_the_input_columns(fallback_workspace, source, tmp_path, embedder):
    session = Session.open(fallback_workspace, embedder=embedder)
    small = tmp_path / "small.csv"
    small.write_text('id,message\n1,"my card got stolen"\n2,"what is the exchange rate"\n')
    for name in ("out.csv", "out.jsonl", "out.parquet"):
        summary = LabelJob(session, small, tmp_path / name, text_column="message").run(progress=False)
        assert summary.rows == 2 and summary.routes == {"fallback": 2}
    table = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [row["label"] for row in table] == ["lost_or_stolen_card", "exchange_rate"]
    assert [row["id"] for row in table] == ["1", "2"] and {"confidence", "route", "top", "message"} <= set(table[0])
    assert (tmp_path / "out.csv").read_text().splitlines()[0] == "id,message,label,confidence,route,top"
    # top: a real list of {label, probability} in JSONL and Parquet (a tool reads it without parsing a string),
    # its JSON text in CSV
    jsonl = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    csv_top = [json.loads(row["top"]) for row in csv.DictReader((tmp_path / "out.csv").open())]
    assert [row["top"] for row in table] == [row["top"] for row in jsonl] == csv_top
    for row in jsonl:
        assert len(row["top"]) == 3 and row["top"][0] == {"label": row["label"], "probability": row["confidence"]}
        assert [t["probability"] for t in row["top"]] == sorted((t["probability"] for t in row["top"]), reverse=True)


def test_outputs_load_typed_in_pandas_and_datasets(fallback_workspace, tmp_path, embedder):
    """No parsing needed downstream: `top` is a list of records, `confidence` a float, an abstained row's label a
    null (the banking task may answer none), in pandas and in a Hugging Face dataset alike."""
    import datasets
    import pandas as pd

    session = Session.open(fallback_workspace, embedder=embedder)
    session.set_policy(session.policy.model_copy(update={"abstain_threshold": 0.9}))  # as calibrate sets it for a router
    source = write_texts_jsonl(tmp_path / "in.jsonl", [{"text": "my card got stolen"},
                                                        {"text": "what's the weather today?"}])
    for name in ("out.jsonl", "out.parquet"):
        LabelJob(session, source, tmp_path / name).run(progress=False)
    session.close()
    frames = [pd.read_json(tmp_path / "out.jsonl", lines=True), pd.read_parquet(tmp_path / "out.parquet")]
    for frame in frames:
        assert frame["confidence"].dtype == "float64" and frame["id"].tolist() == [0, 1]
        assert frame["label"].iloc[0] == "lost_or_stolen_card" and frame["label"].isna().iloc[1]
        assert frame["route"].tolist() == ["fallback", "abstain"]
        assert [top["label"] for top in frame["top"].iloc[0]][0] == "lost_or_stolen_card"
    for kind, name in (("json", "out.jsonl"), ("parquet", "out.parquet")):
        table = datasets.load_dataset(kind, data_files=str(tmp_path / name), split="train",
                                      cache_dir=str(tmp_path / "hf"))
        assert table.features["confidence"].dtype == "float64"
        assert table.features["top"] == datasets.List({"label": datasets.Value("string"),
                                                       "probability": datasets.Value("float64")})
        assert table[0]["top"][0]["label"] == "lost_or_stolen_card" and table[1]["label"] is None


def test_a_second_job_on_the_same_output_is_refused_and_leaves_the_first_ones_state(fallback_workspace, tmp_path,
                                                                                       embedder):
    """Two jobs writing one output used to meet in SQLite, and the second called the first one's state damaged and
    advised deleting it. The job's lock now refuses the second at once, naming what to do."""
    source = write_texts_jsonl(tmp_path / "in.jsonl", load_split("banking77", "test")[:10])
    out = tmp_path / "out.jsonl"
    state = out.with_name(out.name + STATE_SUFFIX)
    session = Session.open(fallback_workspace, embedder=embedder)
    with open(state.with_name(state.name + ".lock"), "w") as first_job:
        fcntl.flock(first_job, fcntl.LOCK_EX)  # what a running job holds
        with pytest.raises(InputError, match=r"out.jsonl: another labelling job is writing this output now.*wait"):
            LabelJob(session, source, out).run(progress=False)
        assert not state.exists() and not out.exists()
    assert LabelJob(session, source, out).run(progress=False).rows == 10  # once the first is done, it runs
    session.close()


def test_a_multi_label_answer_is_a_list_in_jsonl_and_parquet_and_joined_in_csv(tmp_path, embedder):
    """As `top` is: a pandas or `datasets` user gets the labels without splitting a string; a CSV cell keeps the
    "a|b" that `add` and `init --data` read. Each output reads back as the labels it holds."""
    task = Task.build({"name": "tags", "multi_label": True, "labels": ["battery", "screen", "shipping"], "examples": [
        {"text": "the battery dies fast and the screen cracked", "label": ["battery", "screen"]},
        {"text": "screen is too dim", "label": "screen"}, {"text": "battery lasts two days", "label": "battery"},
        {"text": "shipping took three weeks", "label": "shipping"},
        {"text": "arrived late and the box was crushed", "label": "shipping"},
        {"text": "the screen flickers at night", "label": "screen"},
        {"text": "charging is slow and it ships without a charger", "label": ["battery", "shipping"]}]})
    session = Session.create(task, workspace=tmp_path / "ws", embedder=embedder, engine=None)
    source = write_texts_jsonl(tmp_path / "in.jsonl", [{"text": text} for text in [
        "my battery is dead", "the package never came", "the display has dead pixels and the battery swells"]])
    texts = [json.loads(line)["text"] for line in source.read_text().splitlines()]
    expected = [p.labels for p in session.classify(texts, learn=False)]
    assert any(len(labels) > 1 for labels in expected)
    for name in ("out.jsonl", "out.parquet", "out.csv"):
        LabelJob(session, source, tmp_path / name).run(progress=False)
    jsonl = [json.loads(line)["label"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    parquet = pq.read_table(tmp_path / "out.parquet").column("label").to_pylist()
    cells = [row["label"] for row in csv.DictReader((tmp_path / "out.csv").open())]
    assert jsonl == parquet == [list(labels) for labels in expected]
    assert cells == ["|".join(labels) for labels in expected]
    for name in ("out.jsonl", "out.parquet", "out.csv"):
        read_back = [list(row.labels) for row in read_rows(tmp_path / name, label_column="label")]
        assert read_back == [list(labels) for labels in expected]
    session.close()


def test_a_job_never_writes_over_its_input_nor_over_a_file_it_did_not_write(fallback_workspace, tmp_path, embedder):
    """`label in.csv in.csv` replaced the input with the output, and an existing file at the output's path was
    replaced without a word. A rerun of a finished job (its state beside the output) still writes its output again."""
    source = write_texts_jsonl(tmp_path / "in.jsonl", load_split("banking77", "test")[:10])
    original = source.read_bytes()
    session = Session.open(fallback_workspace, embedder=embedder)
    with pytest.raises(InputError, match=r"in.jsonl: this is the input file; write the answers to another file"):
        LabelJob(session, source, tmp_path / "." / "in.jsonl").run(progress=False)
    (tmp_path / "link.jsonl").symlink_to(source)
    with pytest.raises(InputError, match=r"this is the input file"):
        LabelJob(session, source, tmp_path / "out.jsonl", review=tmp_path / "link.jsonl").run(progress=False)
    with pytest.raises(InputError, match=r"the review file would replace the output"):
        LabelJob(session, source, tmp_path / "out.jsonl", review=tmp_path / "out.jsonl").run(progress=False)
    assert source.read_bytes() == original

    theirs = tmp_path / "theirs.jsonl"
    theirs.write_text("somebody's work\n")
    for review in (None, theirs):  # at the output's path, then at the review's
        output = theirs if review is None else tmp_path / "out.jsonl"
        with pytest.raises(InputError, match=r"theirs.jsonl exists and is not the output of this job .*--overwrite"):
            LabelJob(session, source, output, review=review).run(progress=False)
    assert theirs.read_text() == "somebody's work\n" and not (tmp_path / "out.jsonl").exists()
    assert LabelJob(session, source, theirs, overwrite=True).run(progress=False).rows == 10
    labelled = theirs.read_text()
    assert len(labelled.splitlines()) == 10
    assert LabelJob(session, source, theirs).run(progress=False).done_before == 10  # its own output, written again
    assert theirs.read_text() == labelled
    session.close()


def test_a_bad_row_stops_the_job_before_any_work_and_names_its_line(fallback_workspace, tmp_path, embedder):
    session = Session.open(fallback_workspace, embedder=embedder)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": ""}\n')
    with pytest.raises(InputError, match=r"bad.jsonl: line 2: text: empty"):
        LabelJob(session, bad, tmp_path / "out.jsonl").run(progress=False)
    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text('{"text": "fine", "label": "x"}\n')
    with pytest.raises(InputError, match="--prefix"):
        LabelJob(session, labelled, tmp_path / "out2.jsonl").run(progress=False)
    assert LabelJob(session, labelled, tmp_path / "out3.jsonl", prefix="pred_").run(progress=False).rows == 1


@pytest.fixture()
def llm_workspace(tmp_path, embedder, gemma):
    """A banking workspace that sends every text to the real embedded LLM, and a 12-row input."""
    session = Session.create(BANKING_TASK, workspace=tmp_path / "ws", embedder=embedder, engine=gemma,
                            policy=Policy(accept_threshold=1.0, examples=2, learn=False))
    source = tmp_path / "in.jsonl"
    texts = banking_messages()[0][:12]
    source.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    yield session, source
    session.close()


def cached_answers(workspace: Path) -> int:
    """LLM answers a running job has put in the workspace's answer cache."""
    return rows_in(workspace / CACHE_FILE, "answers")


def label_with_llm(workspace: Path, source: Path, out: Path, *options: str, batch_size: int = 12) -> list[str]:
    return [str(Path(sys.executable).with_name("labelcascade")), "label", str(workspace), str(source), str(out),
            "--batch-size", str(batch_size), *options]


def in_a_terminal(command: list[str], timeout: float = 600) -> tuple[int, str]:
    """Run `command` with its stderr on a pseudo-terminal of 160 columns, as in a person's shell; (its exit status,
    what it wrote there)."""
    main, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=terminal)
    os.close(terminal)
    written = bytearray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # the process closed its end
            break
        if not chunk:
            break
        written += chunk
    os.close(main)
    return process.wait(timeout=max(1.0, deadline - time.monotonic())), written.decode(errors="replace")


def test_off_a_terminal_the_progress_is_a_line_per_state_not_frames_joined_by_carriage_returns(fallback_workspace,
                                                                                               source, tmp_path):
    """In a log file (nohup, cron, a service manager) the bar's frames, redrawn in place after carriage returns,
    made the whole job one line: now each state shown is a line, at most every JobBar.LOG_SECONDS."""
    out = tmp_path / "out.csv"
    command = [str(Path(sys.executable).with_name("labelcascade")), "label", str(fallback_workspace), str(source),
               str(out), "--engine", "none", "--batch-size", str(BATCH)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr
    bars = [line for line in result.stderr.splitlines() if line.startswith("labelling:")]
    assert 2 <= len(bars) < ROWS // BATCH  # the first state and the last, not one per batch
    assert f"| {ROWS}/{ROWS} [" in bars[-1] and "fallback=" in bars[-1]


@pytest.mark.slow
def test_the_progress_bar_moves_within_a_batch_and_shows_the_budget_without_native_log_lines(llm_workspace, tmp_path):
    """The bar sat at 0 through a whole first batch of LLM work, llama.cpp's log lines broke it, and it never showed
    the budget. One batch of 12 rows, 6 of them for the LLM, two per LLM call: the bar moves before the batch ends."""
    session, source = llm_workspace
    session.set_policy(session.policy.model_copy(update={"llm_batch": 2}))
    out = tmp_path / "out.jsonl"
    returncode, stderr = in_a_terminal(label_with_llm(session.path, source, out, "--max-llm-calls", "6", "--no-cache"))
    assert returncode == 0, stderr
    frames = [frame for frame in stderr.replace("\r", "\n").splitlines() if frame.strip()]
    shown = [int(match.group(1)) for frame in frames if (match := re.search(r"\| (\d+)/12 \[", frame))]
    assert any(0 < rows < 12 for rows in shown), frames  # within the one batch, as the LLM answered
    within = [frame for frame in frames if re.search(r"\| \d/12 \[|\| 1[01]/12 \[", frame)]
    assert any(re.search(r"llm calls=[1-5],", frame) and "budget left=" in frame and "llm/s=" in frame
               for frame in within), frames  # the calls, the budget and the LLM's rate move within the batch too
    assert shown[-1] == 12 and "budget left=0" in frames[-2] and "llm calls=6" in frames[-2]
    assert not [frame for frame in frames if frame.startswith("llama")]  # llama.cpp's log goes to Python logging
    assert "LLM calls 6" in frames[-1]


@pytest.mark.slow
def test_llm_answers_of_a_batch_killed_midway_are_kept_and_not_asked_again(llm_workspace, tmp_path):
    """A kill lost the LLM answers of the batch in flight, and the rerun asked for them again. They now go into the
    answer cache as each LLM call returns, so the rerun takes them from there."""
    session, source = llm_workspace
    session.set_policy(session.policy.model_copy(update={"llm_batch": 2}))
    out = tmp_path / "out.jsonl"
    command = label_with_llm(session.path, source, out, "--no-progress")
    process = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while cached_answers(session.path) < 4 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the job finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    state = out.with_name(out.name + STATE_SUFFIX)
    kept = cached_answers(session.path)
    assert rows_done(state) == 0 and 4 <= kept < 12  # the batch never committed; its LLM answers so far are kept
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0 and f"LLM calls {12 - kept}, cached answers {kept}" in finished.stderr


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_a_job_stopped_by_a_signal_saves_what_it_learned_before_it_ends(llm_workspace, tmp_path, caplog, stop):
    """SIGTERM ended the process at once, and Ctrl-C skipped the command's `session.close()`: the LLM labels learned
    so far were in SQLite but not in the saved FAISS index, which the next open rebuilt, with a warning."""
    session, source = llm_workspace
    session.set_policy(session.policy.model_copy(update={"llm_batch": 2, "learn": True, "learn_threshold": 0.0}))
    out = tmp_path / "out.jsonl"
    command = label_with_llm(session.path, source, out, "--no-progress", "--no-cache", batch_size=2)
    # Ctrl-C reaches the job as in a terminal, even where this test runs with SIGINT ignored (a background job)
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    state = out.with_name(out.name + STATE_SUFFIX)
    deadline = time.monotonic() + 300
    while rows_done(state) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the job finished before it could be stopped"
    process.send_signal(stop)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == (-signal.SIGTERM if stop == signal.SIGTERM else 130), stderr
    assert "stopped: the batches labelled so far are kept; rerun the same command to resume" in stderr
    done = rows_done(state)
    assert 2 <= done < 12
    with caplog.at_level("INFO", logger="labelcascade.retrieval.store"), \
            ExampleStore.open(session.path / "store") as store:
        assert len(store) > 80  # the seed examples and what the job learned
    assert "rebuilding" not in caplog.text  # the saved index holds what was learned
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0 and f"({done} done by an earlier run)" in finished.stderr


def test_a_budget_caps_llm_calls_over_the_job_and_its_resumed_runs(llm_workspace, tmp_path):
    session, source = llm_workspace
    out = tmp_path / "out.jsonl"
    summary = LabelJob(session, source, out, batch_size=4, max_llm_calls=5, cache=False).run(progress=False)
    assert summary.rows == 12 and summary.llm_calls == 5 and summary.routes == {"llm": 5, "fallback": 7}
    assert [json.loads(line)["route"] for line in out.read_text().splitlines()] == ["llm"] * 5 + ["fallback"] * 7
    # a rerun of a finished job asks nothing more, and counts what the earlier run spent
    again = LabelJob(session, source, out, batch_size=4, max_llm_calls=5, cache=False).run(progress=False)
    assert again.done_before == 12 and again.llm_calls == 5


def test_the_answer_cache_makes_a_second_job_on_the_same_texts_ask_the_llm_nothing(llm_workspace, tmp_path, gemma):
    session, source = llm_workspace
    first = LabelJob(session, source, tmp_path / "first.jsonl").run(progress=False)
    assert first.llm_calls == 12 and first.cached == 0
    prompts = gemma.stats.prompts
    second = LabelJob(session, source, tmp_path / "second.csv").run(progress=False)
    assert second.llm_calls == 0 and second.cached == 12 and gemma.stats.prompts == prompts
    labels = [json.loads(line)["label"] for line in (tmp_path / "first.jsonl").read_text().splitlines()]
    with (tmp_path / "second.csv").open(newline="") as file:
        assert [row["label"] for row in csv.DictReader(file)] == labels


def test_a_calibration_or_a_retrain_makes_cached_answers_be_computed_again(llm_workspace, tmp_path, gemma):
    """The cache keeps an answer for the fallback and policy that made it: after a retrain (a new fallback) or
    `calibrate` (a new policy) the same texts are answered afresh, and then cached under the new version."""
    session, source = llm_workspace
    assert LabelJob(session, source, tmp_path / "first.jsonl").run(progress=False).llm_calls == 12

    version = session.answer_version()
    session.add_examples(["my new card still has not arrived"], ["card_arrival"], retrain=True)
    assert session.answer_version() != version
    prompts = gemma.stats.prompts
    after_retrain = LabelJob(session, source, tmp_path / "second.jsonl").run(progress=False)
    assert after_retrain.cached == 0 and after_retrain.llm_calls == 12 and gemma.stats.prompts > prompts
    again = LabelJob(session, source, tmp_path / "third.jsonl").run(progress=False)
    assert again.cached == 12 and again.llm_calls == 0

    version = session.answer_version()
    texts, labels = banking_messages()
    session.calibrate(texts[12:20], labels[12:20])  # the first 12 are the job's rows
    assert session.answer_version() != version
    # whatever calibration chose, every row asks the LLM again
    session.set_policy(session.policy.model_copy(update={"accept_threshold": 1.0, "llm_weight": 0.5, "learn": False}))
    after_calibration = LabelJob(session, source, tmp_path / "fourth.jsonl").run(progress=False)
    assert after_calibration.cached == 0 and after_calibration.llm_calls == 12


def test_the_review_file_holds_the_low_confidence_rows_with_their_row_numbers(llm_workspace, tmp_path):
    session, source = llm_workspace
    summary = LabelJob(session, source, tmp_path / "out.jsonl", review=tmp_path / "review.jsonl",
                       review_below=0.6).run(progress=False)
    answered = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    review = [json.loads(line) for line in (tmp_path / "review.jsonl").read_text().splitlines()]
    expected = [i + 1 for i, row in enumerate(answered) if row["confidence"] < 0.6]
    assert [row["row"] for row in review] == expected and summary.review_rows == len(expected)
    assert all(row["label"] == answered[row["row"] - 1]["label"] for row in review)


def test_by_default_review_takes_the_answers_less_than_halfway_from_a_guess_to_certainty(tmp_path, embedder):
    """A fixed 0.5 never sent a row of a two-label task to review (its answers are always at least 0.5 sure)."""
    texts, labels = few_shot("sst2", 8)
    task = Task.build({"name": "sentiment", "labels": ["negative", "positive"]})
    session = Session.create(task, workspace=tmp_path / "ws", embedder=embedder, engine=None)
    session.add_examples(texts, labels, retrain=True)
    source = write_texts_jsonl(tmp_path / "reviews.jsonl", load_split("sst2", "test")[:80])
    summary = LabelJob(session, source, tmp_path / "out.jsonl", review=tmp_path / "review.jsonl").run(progress=False)
    answered = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    unsure = [i + 1 for i, row in enumerate(answered) if row["confidence"] < 0.75]
    assert summary.review_below == 0.75 and 0 < len(unsure) < len(answered)
    assert [json.loads(line)["row"] for line in (tmp_path / "review.jsonl").read_text().splitlines()] == unsure
    session.close()
    assert review_threshold(Task.from_yaml(BANKING_TASK)) == pytest.approx(0.55)  # ten labels
    assert review_threshold(Task.build({"name": "tags", "multi_label": True, "labels": ["a", "b", "c"]})) == 0.75


def test_a_plan_estimates_llm_calls_and_time_without_storing_or_learning(llm_workspace, tmp_path):
    session, source = llm_workspace
    stored = len(session.store)
    out = tmp_path / "out.jsonl"
    plan = LabelJob(session, source, out, max_llm_calls=7, cache=False).plan(sample=12, llm_sample=3)
    assert plan.rows == 12 and plan.sampled == 12 and plan.llm_share == 1.0 and plan.llm_calls == 7
    assert plan.llm_s_per_call > 0 and plan.estimated_s >= 7 * plan.llm_s_per_call
    assert "7 LLM calls" in plan.describe()
    assert not out.exists() and not out.with_name(out.name + ".state.sqlite").exists()
    assert len(session.store) == stored
