"""Two real processes using one workspace at once lose no example.

Each process opens the same workspace and, in small batches, adds examples (gold, and LLM-sourced ones as learning
stores them), retrains the fallback, saves the settings and searches, while the other does the same; a third of
the texts are added by both. Afterwards every example is stored exactly once with the label its most trusted
source gave, the FAISS file holds exactly the ids SQLite holds, and the fallback loads and answers. (The LLM's own
answers are not needed for this: learning stores them through the same `add` + retrain calls used here.)
CI: 2 processes x 12 batches; LABELCASCADE_RELIABILITY=long: 3 processes x 30 batches.
"""

import json
import subprocess
import sys
import textwrap

import faiss
import pytest

from labelcascade import Session
from labelcascade.records import Source
from labelcascade.retrieval.store import DB_FILE, INDEX_FILE, ExampleStore
from labelcascade.workspace import STORE_DIR

from ..conftest import BANKING_TASK, load_split
from .conftest import scaled

pytestmark = pytest.mark.slow  # several processes share a workspace

PROCESSES = scaled(2, 3)
BATCHES = scaled(12, 30)
BATCH = 20
WORKER_TIMEOUT_S = 300

WORKER = textwrap.dedent("""
    import json, sys
    from labelcascade import Session
    workspace, texts_file, source = sys.argv[1:]
    rows = json.loads(open(texts_file).read())
    session = Session.open(workspace, engine=None)
    for start in range(0, len(rows), %(batch)d):
        batch = rows[start:start + %(batch)d]
        session.add_examples([r[0] for r in batch], [r[1] for r in batch], source=source,
                                confidence=1.0 if source == "gold" else 0.9)
        if start // %(batch)d %% 3 == 2:
            session.retrain()
            session.set_policy(session.policy)
        session.store.search(session.embedder.embed([batch[0][0]]), 4)
    session.retrain()
    session.close()
""") % {"batch": BATCH}


def test_processes_sharing_a_workspace_lose_no_example_and_keep_the_index_in_step(tmp_path, embedder):
    workspace = tmp_path / "ws"
    Session.create(BANKING_TASK, workspace=workspace, embedder=embedder, engine=None).close()
    seeds = {e.text: e.labels for e in ExampleStore.open(workspace / STORE_DIR).examples()}
    names = {line.split(":", 1)[1].strip() for line in BANKING_TASK.read_text().splitlines() if line.startswith("- name:")}
    rows = [(r["text"], r["label"]) for r in load_split("banking77", "train") if r["label"] in names]
    rows = [row for row in dict(rows).items() if row[0] not in seeds]
    per_process, shared = BATCHES * BATCH, BATCHES * BATCH // 3
    sources = [Source.GOLD.value if i % 2 == 0 else Source.LLM.value for i in range(PROCESSES)]
    given = []
    for i in range(PROCESSES):  # each process's texts overlap the previous one's by `shared`
        start = i * (per_process - shared)
        given.append(rows[start : start + per_process])
        (tmp_path / f"rows{i}.json").write_text(json.dumps(given[i]))
    (tmp_path / "worker.py").write_text(WORKER)

    workers = [subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), str(workspace),
                                 str(tmp_path / f"rows{i}.json"), sources[i]],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(PROCESSES)]
    for worker in workers:
        _, stderr = worker.communicate(timeout=WORKER_TIMEOUT_S)
        assert worker.returncode == 0, stderr[-3000:]

    store = ExampleStore.open(workspace / STORE_DIR)
    stored = {e.text: e for e in store.examples()}
    expected = {text: labels for text, labels in seeds.items()}
    for rows_given in given:
        expected.update({text: (label,) for text, label in rows_given})
    assert len(stored) == len(store) == len(expected)  # each text once, none lost
    assert {text: e.labels for text, e in stored.items()} == expected
    gold_texts = {text for i, rows_given in enumerate(given) if sources[i] == "gold" for text, _ in rows_given}
    assert all(stored[text].source is Source.GOLD for text in gold_texts)  # an LLM label never replaced a person's
    store.close()

    index = faiss.read_index(str(workspace / STORE_DIR / INDEX_FILE))
    with ExampleStore.open(workspace / STORE_DIR) as reopened:
        ids = sorted(e.id for e in reopened.examples())
    assert sorted(faiss.vector_to_array(index.id_map).tolist()) == ids  # the saved index agrees with SQLite
    assert (workspace / STORE_DIR / DB_FILE).is_file()
    session = Session.open(workspace, embedder=embedder, engine=None)
    assert session.classify("my card got stolen").label == "lost_or_stolen_card"
    assert not list(workspace.glob("fallback.*")) and not list((workspace / STORE_DIR).glob("*.tmp"))
    session.close()
    print(f"\n{PROCESSES} processes, {BATCHES} batches of {BATCH} each: {len(expected)} examples checked "
          f"({len(seeds)} seeds, {sum(map(len, given))} given, {len(ids)} ids in SQLite and FAISS)")
