"""Storage faults, caused for real: a full disk and a read-only workspace (a tiny tmpfs, full or remounted read-only;
the tests run as root and skip, saying why, where mounting is not allowed), and damaged files (truncated, or bytes
overwritten) in every file a workspace holds.

Each fault must give one clear error that names the file and what to do, and leave the workspace whole: every
example stored before is still there, and the previous model still gives the same answers. A damaged file is never
used: the example index is rebuilt from SQLite (which holds every vector), anything else is refused on open.
"""

import json
import random
import shutil
import sqlite3
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from labelcascade import Session
from labelcascade.jobs import LabelJob
from labelcascade.retrieval.store import DB_FILE, INDEX_FILE, StoreError
from labelcascade.tables import InputError
from labelcascade.session import DEV_FILE
from labelcascade.workspace import CALIBRATION_FILE, FALLBACK_DIR, SETTINGS_FILE, STORE_DIR, Workspace, WorkspaceError

from ..conftest import BANKING_TASK, banking_messages, load_split, probability_matrix

pytestmark = pytest.mark.slow  # real full and read-only file systems, CLI processes

PROBES = ["my card got stolen", "what is the exchange rate", "I want my money back", "close my account please"]
CLI_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def template(fallback_workspace) -> Path:
    """A banking workspace (80 seed examples, a trained fallback), copied by each test."""
    return fallback_workspace


@pytest.fixture(scope="module")
def more_examples() -> tuple[list[str], list[str]]:
    names = {line.split(":", 1)[1].strip() for line in BANKING_TASK.read_text().splitlines() if line.startswith("- name:")}
    rows = [row for row in load_split("banking77", "train") if row["label"] in names][:300]
    return [row["text"] for row in rows], [row["label"] for row in rows]


def snapshot(path: Path, embedder) -> tuple[list[tuple[str, tuple[str, ...]]], np.ndarray]:
    """The stored examples and the answers to the probes: what must survive a fault unchanged."""
    session = Session.open(path, embedder=embedder, engine=None)
    try:
        examples = [(e.text, e.labels) for e in session.store.examples()]
        return examples, probability_matrix(session, PROBES)
    finally:
        session.close()


@contextmanager
def tmpfs(folder: Path, size: str):
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True, timeout=30)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); the fault needs root and mount")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], timeout=30, check=True)


def fill(folder: Path) -> None:
    """Use up every free byte of the file system that holds `folder`: big writes, then single bytes."""
    with (folder / "filler").open("wb", buffering=0) as file:
        for chunk in (b"\0" * 65536, b"\0"):
            try:
                while True:
                    file.write(chunk)
            except OSError:
                pass


def one_line_cli_error(*args: str) -> str:
    script = Path(sys.executable).with_name("labelcascade")
    result = subprocess.run([str(script), *args], capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:") or "Traceback" in line]
    assert result.returncode == 1 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_a_full_disk_gives_clear_errors_and_loses_nothing(template, embedder, more_examples, tmp_path):
    with tmpfs(tmp_path / "disk", "8m") as disk:
        workspace = disk / "ws"
        shutil.copytree(template, workspace)
        before = snapshot(workspace, embedder)
        (tmp_path / "more.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n"
                                                     for t, y in zip(*more_examples, strict=True)))
        session = Session.open(workspace, embedder=embedder, engine=None)
        fill(disk)

        texts, labels = more_examples
        with pytest.raises(StoreError, match=r"examples.sqlite: cannot store examples: .*full.*free some disk space"):
            session.add_examples(texts, labels)
        with pytest.raises(WorkspaceError, match=r"fallback.new: cannot save the retrained fallback model: No space"):
            session.retrain()
        with pytest.raises(WorkspaceError, match=rf"{SETTINGS_FILE}: cannot write {SETTINGS_FILE}: No space"):
            session.set_policy(session.policy.model_copy(update={"accept_threshold": 0.1}))
        job_input = tmp_path / "job.jsonl"
        job_input.write_text("".join(json.dumps({"text": t}) + "\n" for t in PROBES))
        with pytest.raises(InputError, match=r"out.jsonl.state.sqlite: cannot record the job's progress"):
            LabelJob(session, job_input, disk / "out.jsonl").run(progress=False)
        session.close()
        message = one_line_cli_error("add", str(workspace), str(tmp_path / "more.jsonl"))
        assert "examples.sqlite: cannot store examples" in message and "free some disk space" in message

        (disk / "filler").unlink()
        assert snapshot(workspace, embedder)[0] == before[0]
        assert np.array_equal(snapshot(workspace, embedder)[1], before[1])  # the previous model, whole
        assert sorted(p.name for p in workspace.iterdir()) == sorted(p.name for p in template.iterdir())
        session = Session.open(workspace, embedder=embedder, engine=None)  # and it works again
        session.add_examples(texts, labels)
        session.retrain()
        assert len(session.store) == len(before[0]) + len(set(texts) - {text for text, _ in before[0]})
        session.close()


def test_a_read_only_workspace_answers_but_refuses_changes_clearly(template, embedder, more_examples, tmp_path):
    with tmpfs(tmp_path / "disk", "8m") as disk:
        workspace = disk / "ws"
        shutil.copytree(template, workspace)
        before = snapshot(workspace, embedder)
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True, timeout=30)

        session = Session.open(workspace, embedder=embedder, engine=None)
        assert np.array_equal(probability_matrix(session, PROBES), before[1])  # reading needs no writes
        with pytest.raises(StoreError, match=r"examples.sqlite: cannot store examples: .*readonly.*read-only here"):
            session.add_examples(*more_examples)
        with pytest.raises(WorkspaceError, match=r"cannot save the retrained fallback model: Read-only file system"):
            session.retrain()
        session.close()
        message = one_line_cli_error("retrain", str(workspace))
        assert "Read-only file system" in message and "make it writable" in message

        subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True, timeout=30)
        after = snapshot(workspace, embedder)
        assert after[0] == before[0] and np.array_equal(after[1], before[1])


def damage(path: Path, how: str) -> None:
    content = bytearray(path.read_bytes())
    if how == "truncated":
        content = content[: len(content) // 2]
    elif how == "garbage":  # a run of random bytes across the middle of the file, same size
        start = len(content) // 3
        content[start : start + 4096] = random.Random(0).randbytes(len(content[start : start + 4096]))
    elif how == "flipped":  # one bit, past the header
        content[len(content) * 2 // 3] ^= 0x01
    path.write_bytes(bytes(content))


REFUSED = [
    (f"{STORE_DIR}/{DB_FILE}", "truncated", StoreError, "examples.sqlite: the example store is damaged"),
    (f"{STORE_DIR}/{DB_FILE}", "garbage", StoreError, "examples.sqlite: the example store is damaged"),
    (f"{FALLBACK_DIR}/model.npz", "truncated", WorkspaceError, "fallback model is damaged.*labelcascade retrain"),
    (f"{FALLBACK_DIR}/model.npz", "flipped", WorkspaceError, "fallback model is damaged.*sha256"),
    (f"{FALLBACK_DIR}/model.json", "truncated", WorkspaceError, "fallback model is damaged"),
    (f"{FALLBACK_DIR}/model.json", "flipped", WorkspaceError, "fallback model is damaged"),
    (SETTINGS_FILE, "truncated", WorkspaceError, f"{SETTINGS_FILE}: invalid settings"),
    (SETTINGS_FILE, "garbage", WorkspaceError, f"{SETTINGS_FILE}: invalid settings"),
]


@pytest.mark.parametrize(("name", "how", "error", "message"), REFUSED, ids=[f"{n}-{h}" for n, h, *_ in REFUSED])
def test_a_damaged_file_is_refused_on_open_naming_it(template, embedder, tmp_path, name, how, error, message):
    workspace = tmp_path / "ws"
    shutil.copytree(template, workspace)
    damage(workspace / name, how)
    with pytest.raises(error, match=message):
        Session.open(workspace, embedder=embedder, engine=None)


def test_a_damaged_calibration_report_is_refused_naming_it(template, tmp_path):
    workspace = tmp_path / "ws"
    shutil.copytree(template, workspace)
    (workspace / CALIBRATION_FILE).write_text('{"policy": {"accept_thr')
    with pytest.raises(WorkspaceError, match=rf"{CALIBRATION_FILE}: damaged or invalid.*calibrate"):
        Workspace.open(workspace).load_calibration()


@pytest.mark.parametrize("how", ["truncated", "garbage", "flipped"])
def test_a_damaged_faiss_index_is_rebuilt_from_sqlite_and_answers_the_same(template, embedder, tmp_path, how):
    """The index holds nothing SQLite does not: a damaged one (even one FAISS still reads, with a flipped bit in a
    vector) is caught by its sha256 and rebuilt, so retrieval finds exactly what an intact index finds."""
    workspace = tmp_path / "ws"
    shutil.copytree(template, workspace)
    intact = Session.open(template, embedder=embedder, engine=None)
    queries = embedder.embed(PROBES)
    expected = [[(n.example.id, round(n.score, 5)) for n in row] for row in intact.store.search(queries, 8)]
    intact.close()
    damage(workspace / STORE_DIR / INDEX_FILE, how)
    session = Session.open(workspace, embedder=embedder, engine=None)
    found = [[(n.example.id, round(n.score, 5)) for n in row] for row in session.store.search(queries, 8)]
    session.close()
    assert found == expected
    assert (workspace / STORE_DIR / INDEX_FILE).read_bytes() == (template / STORE_DIR / INDEX_FILE).read_bytes()


def test_the_cli_reports_a_damaged_model_in_one_line(template, tmp_path):
    workspace = tmp_path / "ws"
    shutil.copytree(template, workspace)
    damage(workspace / FALLBACK_DIR / "model.npz", "flipped")
    message = one_line_cli_error("classify", str(workspace), "my card got stolen")
    assert "model is damaged" in message and f"labelcascade retrain {workspace}" in message


@pytest.mark.parametrize("how", ["emptied", "replaced", "deleted"])
def test_an_emptied_replaced_or_missing_example_store_is_refused_never_made_anew(template, embedder, tmp_path, how):
    """A store that exists but holds no examples used to open as a new empty store, and the next classify wrote an
    empty index over the real one: the workspace's examples were gone. Now it is refused, by the Python API and the
    CLI, and neither the database file nor the index is touched."""
    workspace = tmp_path / "ws"
    shutil.copytree(template, workspace)
    database, index = workspace / STORE_DIR / DB_FILE, workspace / STORE_DIR / INDEX_FILE
    if how == "emptied":
        database.write_bytes(b"")
    elif how == "replaced":
        database.unlink()
        with sqlite3.connect(database) as other:
            other.execute("CREATE TABLE notes (text TEXT)")
    else:
        database.unlink()
    before = {path.name: path.read_bytes() for path in (database, index) if path.exists()}
    words = "missing" if how == "deleted" else "holds no example store"
    with pytest.raises(StoreError, match=rf"examples.sqlite: {words}.*never made anew"):
        Session.open(workspace, embedder=embedder, engine=None)
    script = Path(sys.executable).with_name("labelcascade")
    result = subprocess.run([str(script), "classify", str(workspace), "my card got stolen", "--engine", "none"],
                            capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    assert result.returncode == 1 and words in result.stderr and "Traceback" not in result.stderr
    assert {path.name: path.read_bytes() for path in (database, index) if path.exists()} == before


@pytest.mark.parametrize("name", [FALLBACK_DIR, STORE_DIR, SETTINGS_FILE, "task.yaml"])
def test_a_workspace_part_that_is_a_symbolic_link_is_refused_naming_it(template, embedder, tmp_path, name):
    """A linked fallback/ once made every retrain fail on rmtree and every later open with it; a linked part is now
    refused on open, before anything is written through the link."""
    workspace = tmp_path / "ws"
    shutil.copytree(template, workspace)
    elsewhere = tmp_path / "elsewhere"
    (workspace / name).rename(elsewhere)
    (workspace / name).symlink_to(elsewhere)
    with pytest.raises(WorkspaceError, match=rf"{name}: a symbolic link"):
        Session.open(workspace, embedder=embedder, engine=None)
    assert (workspace / name).is_symlink() and elsewhere.exists()


def test_a_task_file_cut_short_is_refused_naming_the_labels_it_lost(template, embedder, tmp_path):
    """task.yaml cut after its first labels still parses, but the saved fallback answers labels it no longer has:
    refused with those labels named (it was an index error deep in the cascade)."""
    workspace = tmp_path / "ws"
    shutil.copytree(template, workspace)
    (workspace / "task.yaml").write_text("name: banking-support\nlabels: [card_arrival, change_pin]\n")
    with pytest.raises(ValueError, match=r"the fallback model answers labels that the task does not have \(.*"
                                         r"lost_or_stolen_card.*\): the task was changed or damaged"):
        Session.open(workspace, embedder=embedder, engine=None)


WORKSPACE_FILES = ["task.yaml", SETTINGS_FILE, "workspace.lock", f"{FALLBACK_DIR}/model.json", f"{FALLBACK_DIR}/model.npz",
                   f"{STORE_DIR}/{DB_FILE}", f"{STORE_DIR}/{INDEX_FILE}", CALIBRATION_FILE, DEV_FILE]
REBUILT = {f"{STORE_DIR}/{INDEX_FILE}", "workspace.lock"}  # what holds nothing else does not: made again from the rest
READ_LATER = {CALIBRATION_FILE, DEV_FILE}  # the last calibration: read to show it and to choose the policy again


@pytest.fixture(scope="module")
def calibrated(template, embedder, tmp_path_factory) -> Path:
    """The banking workspace calibrated on 20 held-out messages, so it holds every file a workspace can hold
    (answers.sqlite aside: only a labelling job with an LLM makes it, and a damaged one is refused where it is read)."""
    workspace = tmp_path_factory.mktemp("calibrated") / "ws"
    shutil.copytree(template, workspace)
    texts, labels = banking_messages()
    session = Session.open(workspace, embedder=embedder, engine=None)
    session.calibrate(texts[:20], labels[:20])
    session.close()
    return workspace


@pytest.mark.parametrize("how", ["emptied", "garbage", "linked", "deleted"])
@pytest.mark.parametrize("name", WORKSPACE_FILES)
def test_every_workspace_file_damaged_replaced_linked_or_emptied_is_refused_or_rebuilt(calibrated, embedder, tmp_path, name, how):
    """The class behind the emptied store: any file of a workspace, emptied, overwritten with random bytes of the
    same size, replaced by a link to a copy elsewhere, or deleted. Either the open is refused with an error naming
    the file (and nothing of the workspace is written), or the file is one that holds nothing the others do not
    (the FAISS index, the lock file) and the workspace answers exactly as before with every example kept, or it is
    the last calibration, which answers do not read: then what reads it next (its report, a new label, whose policy
    is chosen again on the dev set) uses it intact, or refuses naming it."""
    workspace = tmp_path / "ws"
    shutil.copytree(calibrated, workspace)
    expected_examples, expected_answers = snapshot(calibrated, embedder)
    path = workspace / name
    assert path.exists(), f"{name} is not a file of a calibrated workspace any more; update WORKSPACE_FILES"
    if how == "emptied":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(random.Random(0).randbytes(max(path.stat().st_size, 64)))
    elif how == "linked":
        elsewhere = tmp_path / "elsewhere"
        path.rename(elsewhere)
        path.symlink_to(elsewhere)
    else:
        path.unlink()
    others = {p: p.read_bytes() for p in workspace.rglob("*") if p.is_file() and not p.is_symlink() and p != path}

    def names_it(error: Exception) -> bool:  # the file, or the model folder it is part of
        return str(path) in str(error) or f"{path.parent}:" in str(error)

    try:
        session = Session.open(workspace, embedder=embedder, engine=None)
    except (WorkspaceError, StoreError, ValueError) as error:
        assert names_it(error), f"the error does not name {name}: {error}"
        assert {p: p.read_bytes() for p in others} == others  # nothing written on the way to the refusal
        return
    try:
        examples = [(e.text, e.labels) for e in session.store.examples()]
        answers = probability_matrix(session, PROBES)
        assert name in REBUILT | READ_LATER, f"{name} {how}: opened and answered instead of being refused"
        assert examples == expected_examples and np.allclose(answers, expected_answers)
        if name in READ_LATER and how != "deleted":
            with pytest.raises((WorkspaceError, ValueError)) as refused:
                if name == CALIBRATION_FILE:
                    session.calibration()
                else:
                    session.add_label("travel_notice", ["I'm going abroad next week, do I need to tell you?"])
            assert names_it(refused.value), f"the error does not name {name}: {refused.value}"
    finally:
        session.close()
