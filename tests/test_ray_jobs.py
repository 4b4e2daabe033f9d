"""Labelling jobs on Ray Data (ray_jobs.py) on a local Ray cluster the tests start: the same output as the
single-process job row for row (the fallback alone, and with the real embedded LLM), a killed job resumed, the LLM
budget held across two LLM workers, learning between passes, bad rows named by their line."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from labelcascade import Session, Task
from labelcascade.agent import Policy
from labelcascade.jobs import STATE_SUFFIX, LabelJob
from labelcascade.records import Source
from labelcascade.tables import InputError

from .conftest import BANKING_TASK, banking_messages, label_command, load_split, rows_done, write_texts_jsonl

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]')")
from labelcascade.ray_jobs import LLMStage, RayLabelJob, label_dataset, workspace_archive  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster for the module; jobs run in it rather than starting their own."""
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


ROWS, BATCH = 600, 16


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return write_texts_jsonl(tmp_path_factory.mktemp("input") / "messages.jsonl", load_split("banking77", "test")[:ROWS])


@pytest.fixture(scope="module")
def single_process(fallback_workspace, source, tmp_path_factory, embedder) -> Path:
    """The single-process job's output for `source`, on the fallback alone: what a Ray job must write."""
    out = tmp_path_factory.mktemp("single") / "single.jsonl"
    with Session.open(fallback_workspace, embedder=embedder) as session:
        LabelJob(session, source, out, batch_size=BATCH).run(progress=False)
    return out


def test_a_bad_row_stops_a_ray_job_before_any_work_and_names_its_line(fallback_workspace, tmp_path, embedder):
    session = Session.open(fallback_workspace, embedder=embedder)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": ""}\n')
    connected = ray.is_initialized()
    with pytest.raises(InputError, match=r"bad.jsonl: line 2: text: empty"):
        RayLabelJob(session, bad, tmp_path / "out.jsonl").run(progress=False)
    assert ray.is_initialized() == connected  # refused before any cluster was started
    with pytest.raises(ValueError, match="llm_workers must be at least 1"):
        RayLabelJob(session, bad, tmp_path / "out.jsonl", llm_workers=0)
    with pytest.raises(ValueError, match="llm_gpus must be 0 or more"):
        RayLabelJob(session, bad, tmp_path / "out.jsonl", llm_gpus=-1)


@pytest.mark.slow
def test_a_ray_job_writes_what_the_single_process_job_writes(cluster, fallback_workspace, source, single_process,
                                                            tmp_path, embedder):
    session = Session.open(fallback_workspace, embedder=embedder)
    summary = RayLabelJob(session, source, tmp_path / "ray.jsonl", batch_size=BATCH, fallback_workers=2,
                          pass_rows=300).run(progress=False)  # two passes
    assert summary.rows == ROWS and summary.routes == {"fallback": ROWS}
    assert (tmp_path / "ray.jsonl").read_bytes() == single_process.read_bytes()


@pytest.mark.slow
def test_a_ray_dataset_is_labelled_in_its_order(cluster, fallback_workspace, embedder):
    session = Session.open(fallback_workspace, embedder=embedder)
    texts = [row["text"] for row in load_split("banking77", "test")[:200]]
    labelled = label_dataset(session, ray.data.from_items([{"id": i, "text": t} for i, t in enumerate(texts)]),
                             prefix="pred_", fallback_workers=2).take_all()
    assert [row["id"] for row in labelled] == list(range(200))
    expected = session.classify(texts, learn=False)
    assert [row["pred_label"] for row in labelled] == [p.label for p in expected]
    assert [row["pred_confidence"] for row in labelled] == [round(p.confidence, 4) for p in expected]


def test_a_multi_label_answer_in_a_ray_dataset_is_a_list_of_labels(cluster, tmp_path, embedder):
    task = Task.build({"name": "tags", "multi_label": True, "labels": ["battery", "screen"], "examples": [
        {"text": "the battery dies fast and the screen cracked", "label": ["battery", "screen"]},
        {"text": "screen is too dim", "label": "screen"}, {"text": "battery lasts two days", "label": "battery"},
        {"text": "the screen flickers at night", "label": "screen"},
        {"text": "it never holds a charge", "label": "battery"}]})
    with Session.create(task, workspace=tmp_path / "ws", embedder=embedder, engine=None) as session:
        texts = ["my battery is dead", "the display has dead pixels and the battery swells", "dim screen"]
        labelled = label_dataset(session, ray.data.from_items([{"text": t} for t in texts])).take_all()
        assert [row["label"] for row in labelled] == [list(p.labels) for p in session.classify(texts, learn=False)]


@pytest.fixture()
def llm_session(tmp_path, embedder, gemma):
    """A banking workspace on the real embedded LLM that learns nothing (so one process and a cluster see the same
    store throughout), the fallback answering what it is at least 99.5% sure of (a quarter of the texts below go
    to the LLM)."""
    session = Session.create(BANKING_TASK, workspace=tmp_path / "ws", embedder=embedder, engine=gemma,
                             policy=Policy(accept_threshold=0.995, examples=2, learn=False))
    yield session
    session.close()


def test_with_the_llm_a_ray_job_answers_as_one_process_and_holds_the_budget_over_two_workers(cluster, llm_session,
                                                                                            tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"text": text}) + "\n" for text in banking_messages()[0][:24]))
    single = LabelJob(llm_session, source, tmp_path / "single.jsonl", batch_size=8, cache=False).run(progress=False)
    assert 0 < single.routes["llm"] < 24
    RayLabelJob(llm_session, source, tmp_path / "ray.jsonl", batch_size=8, cache=False, llm_cpus=2).run(progress=False)
    one, many = ([json.loads(line) for line in (tmp_path / name).read_text().splitlines()]
                 for name in ("single.jsonl", "ray.jsonl"))
    assert [(r["label"], r["route"]) for r in many] == [(r["label"], r["route"]) for r in one]
    assert max(abs(a["confidence"] - b["confidence"]) for a, b in zip(one, many, strict=True)) <= 1e-3

    llm_session.set_policy(llm_session.policy.model_copy(update={"accept_threshold": 1.0}))  # every row wants the LLM
    capped = RayLabelJob(llm_session, source, tmp_path / "capped.jsonl", batch_size=2, max_llm_calls=5,
                         llm_workers=2, cache=False).run(progress=False)
    assert capped.llm_calls == 5 and capped.routes == {"llm": 5, "fallback": 19}


def test_an_llm_actor_runs_llama_cpp_on_the_cpus_it_reserves(cluster, llm_session, tmp_path):
    """Ray places actors by the CPUs they reserve (`llm_cpus`, 1 unless told): a llama.cpp engine on more threads
    than that would crowd the cores of the actors placed beside it."""
    archive = [ray.put(workspace_archive(llm_session))]
    for cpus in (1, 2):
        stage = LLMStage(archive, "text", llm_session.engine_spec, None, cpus=cpus)
        engine = stage.session._engine.loaded
        assert engine.spec == llm_session.engine_spec and engine._llm.context_params.n_threads == cpus
        stage.session.close()
        engine.close()
    with pytest.raises(ValueError, match="llm_cpus must be at least 1"):
        RayLabelJob(llm_session, tmp_path / "in.jsonl", tmp_path / "out.jsonl", llm_cpus=0)


def test_an_llm_that_cannot_load_on_a_worker_answers_degraded_as_in_one_process(cluster, tmp_path, embedder):
    model = tmp_path / "broken.gguf"
    model.write_bytes(b"not a model")
    session = Session.create(BANKING_TASK, workspace=tmp_path / "ws", embedder=embedder, engine=f"llamacpp:{model}",
                             policy=Policy(accept_threshold=1.0, learn=False))  # every row wants the LLM
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"text": text}) + "\n" for text in banking_messages()[0][:6]))
    try:
        single = LabelJob(session, source, tmp_path / "single.jsonl", batch_size=3, cache=False).run(progress=False)
        distributed = RayLabelJob(session, source, tmp_path / "ray.jsonl", batch_size=3, cache=False,
                                  llm_cpus=2).run(progress=False)
    finally:
        session.close()
    assert single.routes == distributed.routes == {"degraded": 6}
    assert (tmp_path / "ray.jsonl").read_text() == (tmp_path / "single.jsonl").read_text()


def test_a_ray_job_learns_between_passes(cluster, llm_session, tmp_path):
    llm_session.set_policy(llm_session.policy.model_copy(
        update={"accept_threshold": 1.0, "learn": True, "learn_threshold": 0.0, "retrain_every": 4}))
    fallback = llm_session.cascade.fallback.fingerprint()
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"text": text}) + "\n" for text in banking_messages()[0][30:38]))
    summary = RayLabelJob(llm_session, source, tmp_path / "out.jsonl", batch_size=4, pass_rows=4,
                          cache=False).run(progress=False)
    assert summary.routes == {"llm": 8}
    assert llm_session.store.count(Source.LLM) == 8  # both passes' answers came back to the workspace
    assert llm_session.cascade.fallback.fingerprint() != fallback  # retrained after the first pass's four


@pytest.mark.slow
def test_a_killed_ray_job_resumes_without_relabelling_and_writes_every_row_once(cluster, fallback_workspace, source,
                                                                              single_process, tmp_path):
    """`labelcascade label --ray auto` (the running cluster) killed with SIGKILL mid-job, then run again with
    `--ray local` (a Ray instance of its own): it starts from the rows its state holds, and the output is the
    single-process job's, byte for byte."""
    out = tmp_path / "ray.jsonl"
    command = [*label_command(fallback_workspace, source, out, batch_size=BATCH), "--ray"]
    process = subprocess.Popen([*command, "auto"], stderr=subprocess.DEVNULL, start_new_session=True)
    state = out.with_name(out.name + STATE_SUFFIX)
    deadline = time.monotonic() + 300
    while rows_done(state) < 2 * BATCH and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the job finished before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)  # the driver, and whatever it started
    process.wait()
    done = rows_done(state)
    assert 2 * BATCH <= done < ROWS and not out.exists()
    finished = subprocess.run([*command, "local"], capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr
    assert f"({done} done by an earlier run)" in finished.stderr
    assert out.read_bytes() == single_process.read_bytes()
