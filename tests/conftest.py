"""Shared fixtures: the real embedding model (loaded once) and the public datasets in ../shared/data."""

from __future__ import annotations

import json
import random
import sqlite3
import sys
from pathlib import Path

import numpy as np
import pytest

from labelcascade import Session
from labelcascade.retrieval import load_embedder

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
EXAMPLES = REPO / "examples"
BANKING_TASK = EXAMPLES / "banking" / "task.yaml"


def load_split(dataset: str, split: str) -> list[dict]:
    path = DATA / dataset / f"{split}.jsonl"
    if not path.is_file():
        pytest.fail(f"{path} is missing: the tests read the public datasets from ../shared/data beside the checkout")
    with path.open(encoding="utf-8") as file:
        return [json.loads(line) for line in file]


def few_shot(dataset: str, per_class: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """`per_class` training examples of every label, drawn with a fixed seed."""
    by_label: dict[str, list[str]] = {}
    for row in load_split(dataset, "train"):
        by_label.setdefault(row["label"], []).append(row["text"])
    rng = random.Random(seed)
    texts, labels = [], []
    for label in sorted(by_label):
        for text in rng.sample(by_label[label], per_class):
            texts.append(text)
            labels.append(label)
    return texts, labels


def banking_messages() -> tuple[list[str], list[str]]:
    """The banking example's 40 held-out messages (BANKING77 test texts) and their labels."""
    with (EXAMPLES / "banking" / "messages.jsonl").open(encoding="utf-8") as file:
        rows = [json.loads(line) for line in file]
    return [row["text"] for row in rows], [row["label"] for row in rows]


def banking_dev() -> tuple[list[str], list[str | None]]:
    """The banking example's dev file: 4 texts per intent, then 10 out-of-scope texts (label None)."""
    rows = [json.loads(line) for line in (EXAMPLES / "banking" / "dev.jsonl").read_text().splitlines() if line.strip()]
    return [row["text"] for row in rows], [row["label"] for row in rows]


def held_out(dataset: str, size: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """`size` texts of the test split, drawn with a fixed seed."""
    rows = random.Random(seed).sample(load_split(dataset, "test"), size)
    return [row["text"] for row in rows], [row["label"] for row in rows]


def probability_matrix(session, texts: list[str]) -> np.ndarray:
    """A session's probabilities for `texts` (n_texts, n_labels) in task label order, without learning."""
    return np.array([list(p.probabilities.values()) for p in session.classify(texts, learn=False)])


def write_texts_jsonl(path: Path, rows: list[dict]) -> Path:
    """A labelling job's input: one {"id", "text"} line per row, ids counting from 0."""
    path.write_text("".join(json.dumps({"id": i, "text": row["text"]}) + "\n" for i, row in enumerate(rows)))
    return path


def label_command(workspace: Path, source: Path, destination: Path, *, batch_size: int) -> list[str]:
    """The installed `labelcascade label` on the fallback alone, which is deterministic, for jobs run as processes."""
    script = Path(sys.executable).with_name("labelcascade")
    return [str(script), "label", str(workspace), str(source), str(destination), "--engine", "none",
            "--batch-size", str(batch_size), "--no-progress"]


def rows_in(database: Path, table: str) -> int:
    """Rows of `table` in a SQLite file a running process writes (0 while it cannot be read), read-only, without
    taking any lock of the writer's."""
    try:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=0.1) as db:
            return db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
    except sqlite3.Error:
        return 0


def rows_done(state: Path) -> int:
    """Rows a running job's state file holds."""
    return rows_in(state, "rows")


# Fixtures that bring a real LLM or server: a test that uses one is slow, whatever its module (see pytest_collection_
# modifyitems). Other slow tests carry @pytest.mark.slow themselves.
SLOW_FIXTURES = {"gemma", "unbatched_gemma", "engine", "vllm_server", "vllm_url", "hf_model", "transformers_engine"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def embedder():
    return load_embedder("default")


@pytest.fixture(scope="session")
def embed(embedder):
    """Embed with a cache, so datasets shared by several tests are embedded once per session."""
    cache: dict[str, np.ndarray] = {}

    def run(texts: list[str]) -> np.ndarray:
        missing = [text for text in dict.fromkeys(texts) if text not in cache]
        if missing:
            cache.update(zip(missing, embedder.embed(missing), strict=True))
        return np.stack([cache[text] for text in texts])

    return run


@pytest.fixture(scope="module")
def banking(embedder):
    """The banking task's fallback alone (no LLM), one per test module: fast, and a module's changes stay its own."""
    session = Session.create(BANKING_TASK, embedder=embedder, engine=None)
    yield session
    session.close()


@pytest.fixture(scope="module")
def fallback_workspace(tmp_path_factory, embedder) -> Path:
    """A saved banking workspace that answers with its fallback alone (no LLM), one per test module."""
    folder = tmp_path_factory.mktemp("fallback") / "ws"
    Session.create(BANKING_TASK, workspace=folder, embedder=embedder, engine=None).close()
    return folder


@pytest.fixture(scope="session")
def gemma():
    """The real embedded LLM (Gemma 3 270M through llama.cpp), loaded once."""
    from labelcascade.agent.engines.llamacpp import LlamaCppEngine

    engine = LlamaCppEngine()
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def vllm_server():
    """One real vLLM server on 127.0.0.1 for the whole session, shared by the engine tests and the fault tests (which
    kill it and start it again on its port): a start costs ~70-90 s on 2 cores. Idle, it holds ~7 GB and no CPU
    (the machine stayed 98% idle beside it), so keeping it up between its users costs nothing they measure. Outside
    CI, skipped until `tools/vllm_server.sh setup` has been run."""
    from .agent.engines.conftest import VLLMServer, free_port, require_vllm

    require_vllm()
    server = VLLMServer(free_port())
    try:
        server.start()
        yield server
    finally:
        server.stop()
