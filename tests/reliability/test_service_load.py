"""The HTTP service under load on 127.0.0.1: no error, and every answer the one a direct classify gives.

Fallback only: `labelcascade serve` as a real subprocess (its own process and event loop, so the load generator does
not share a GIL with it) over a saved banking workspace, 1,000 requests at concurrency 32 (10,000 in the long mode),
texts drawn from BANKING77's test split. With the LLM: the real Gemma 3 270M behind an in-process server (the
session's engine, loaded once), every text sent to it, 12 requests at concurrency 32 (50 in the long mode).

p50/p99 are printed (run with -s to see them) and recorded in RELIABILITY.md. Every loop is bounded in count, and
each request by the client's timeout.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
import pytest

from labelcascade import Session
from labelcascade.agent import Policy
from labelcascade.service import create_app

from ..conftest import BANKING_TASK, held_out
from ..test_service import running, serving_process
from .conftest import scaled

pytestmark = pytest.mark.slow  # thousands of HTTP requests

CONCURRENCY = 32


def load(url: str, texts: list[str], *, timeout_s: float) -> list[tuple[int, dict | str, float]]:
    """POST each text to /v1/classify, at most CONCURRENCY in flight; (status, body, seconds) per request."""

    async def send_all() -> list[tuple[int, dict | str, float]]:
        slots = asyncio.Semaphore(CONCURRENCY)
        limits = httpx.Limits(max_connections=CONCURRENCY)
        async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:

            async def send(text: str) -> tuple[int, dict | str, float]:
                async with slots:
                    start = time.perf_counter()
                    response = await client.post("/v1/classify", json={"text": text})
                    seconds = time.perf_counter() - start
                    body = response.json() if response.status_code == 200 else response.text
                    return response.status_code, body, seconds

            return await asyncio.gather(*(send(text) for text in texts))

    return asyncio.run(send_all())


def report(name: str, results: list[tuple[int, dict | str, float]], wall_s: float) -> tuple[float, float]:
    seconds = np.array([result[2] for result in results]) * 1000
    p50, p99 = np.percentile(seconds, 50), np.percentile(seconds, 99)
    print(f"\n{name}: {len(results)} requests at concurrency {CONCURRENCY} in {wall_s:.1f} s "
          f"({len(results) / wall_s:.0f} req/s): p50 {p50:.0f} ms, p99 {p99:.0f} ms, max {seconds.max():.0f} ms")
    return p50, p99


@pytest.fixture(scope="module")
def served_workspace(embedder, tmp_path_factory):
    """A saved banking workspace (fallback only) served by `labelcascade serve` in a subprocess; yields (url, path)."""
    path = tmp_path_factory.mktemp("load") / "ws"
    Session.create(BANKING_TASK, workspace=path, embedder=embedder, engine=None).close()
    server, url = serving_process(path)
    try:
        yield url, path
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_1000_requests_at_concurrency_32_answer_as_a_direct_classify(served_workspace, embedder):
    url, path = served_workspace
    texts, _ = held_out("banking77", scaled(1000, 3000))
    texts = (texts * 4)[: scaled(1000, 10_000)]
    start = time.perf_counter()
    results = load(url, texts, timeout_s=120)
    wall_s = time.perf_counter() - start
    report("fallback only, `labelcascade serve` subprocess", results, wall_s)

    assert [status for status, _, _ in results] == [200] * len(texts), next(r for r in results if r[0] != 200)
    direct = Session.open(path, embedder=embedder, engine=None)
    unique = list(dict.fromkeys(texts))
    expected = dict(zip(unique, direct.classify(unique), strict=True))
    direct.close()
    for text, (_, body, _) in zip(texts, results, strict=True):
        [answer] = body["answers"]
        assert (answer["label"], answer["route"]) == (expected[text].label, "fallback"), text
        assert answer["confidence"] == pytest.approx(expected[text].confidence, abs=1e-4)


def test_llm_backed_requests_are_all_answered_by_the_llm(embedder, gemma):
    """Every text goes to the real Gemma (accept threshold 1). Scores of llama.cpp move by a few hundredths with how
    prompts are batched and which prefix is cached (see llamacpp.py), so answers are compared with a direct
    classify only where the direct answer is clear (its top probability 0.1 above the second)."""
    session = Session.create(BANKING_TASK, embedder=embedder, engine=gemma, policy=Policy(accept_threshold=1.0, learn=False))
    texts, _ = held_out("banking77", scaled(12, 50), seed=1)
    with running(create_app(session)) as url:
        start = time.perf_counter()
        results = load(url, texts, timeout_s=600)
        wall_s = time.perf_counter() - start
    report("real Gemma 3 270M (llama.cpp), in-process server", results, wall_s)
    assert [status for status, _, _ in results] == [200] * len(texts)
    answers = [body["answers"][0] for _, body, _ in results]
    assert [answer["route"] for answer in answers] == ["llm"] * len(texts)
    direct = session.classify(texts)
    session.close()
    for answer, prediction in zip(answers, direct, strict=True):
        first, second = sorted(prediction.probabilities.values(), reverse=True)[:2]
        if first - second > 0.1:
            assert answer["label"] == prediction.label
