"""The HTTP service over real HTTP: a uvicorn server on 127.0.0.1 in a background thread, httpx as the client, and
the real embedder, store and fallback behind it (the embedded LLM too, in the test named so)."""

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import threadpoolctl
import uvicorn
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from labelcascade import Session, Task
from labelcascade.agent import Policy
from labelcascade.retrieval import ExampleStore
from labelcascade.retrieval.embedder_process import EmbedderProcess
from labelcascade.service import create_app, serve
from labelcascade.workspace import Workspace

from .conftest import BANKING_TASK, banking_messages, few_shot, held_out

MESSAGES, _ = banking_messages()


@contextmanager
def running(app: FastAPI) -> Iterator[str]:
    """`app` served by uvicorn on a free port of 127.0.0.1 in a background thread; yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "uvicorn stopped before it started"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def serving_process(workspace: Path, *options: str) -> tuple[subprocess.Popen, str]:
    """`labelcascade serve WORKSPACE --engine none` as a process of its own on a free port of 127.0.0.1, once it
    answers /healthz (stderr piped, for the failure message); (the process, its base URL)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = Path(sys.executable).with_name("labelcascade")
    server = subprocess.Popen([str(script), "serve", str(workspace), "--port", str(port), "--engine", "none", *options],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if server.poll() is not None:
            raise AssertionError(server.stderr.read().decode())
        if time.monotonic() > deadline:
            server.kill()
            raise AssertionError("the service did not start in 120 s")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return server, url
        except httpx.TransportError:
            time.sleep(0.2)


def post_concurrently(url: str, bodies: list[dict], concurrency: int) -> list[httpx.Response]:
    """POST every body to /v1/classify, at most `concurrency` requests in flight at once."""

    async def send_all() -> list[httpx.Response]:
        slots = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:

            async def send(body: dict) -> httpx.Response:
                async with slots:
                    return await client.post("/v1/classify", json=body)

            return await asyncio.gather(*(send(body) for body in bodies))

    return asyncio.run(send_all())


def metric(exposition: str, name: str, **labels: str) -> float:
    """One sample's value from Prometheus text."""
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    raise KeyError(f"no sample {name}{labels}")


@pytest.fixture(scope="module")
def direct(banking):
    """What the session answers for each banking message when called directly, one text at a time."""
    return {text: banking.classify(text) for text in MESSAGES}


def test_200_concurrent_requests_are_batched_and_answer_as_the_classifier_does(banking, direct):
    texts = [MESSAGES[i % len(MESSAGES)] for i in range(200)]
    with running(create_app(banking)) as url:
        responses = post_concurrently(url, [{"text": text} for text in texts], concurrency=16)
        exposition = httpx.get(f"{url}/metrics").text
    assert [r.status_code for r in responses] == [200] * 200
    for text, response in zip(texts, responses, strict=True):
        [answer] = response.json()["answers"]
        expected = direct[text]
        assert (answer["label"], answer["route"]) == (expected.label, expected.route.value) == (expected.label, "fallback")
        assert answer["confidence"] == pytest.approx(expected.confidence, abs=1e-4)
        assert answer["top"][0] == {"label": answer["label"], "probability": answer["confidence"]} and len(answer["top"]) == 3
    assert metric(exposition, "labelcascade_classify_batch_texts_sum") == 200
    assert metric(exposition, "labelcascade_classify_batch_texts_count") < 200  # waiting requests were joined


@pytest.mark.slow
def test_with_the_embedder_in_child_processes_the_next_batch_is_embedded_ahead_and_answers_alike(
        embedder, tmp_path, monkeypatch):
    """What `serve` runs: the session's embedder in child processes. While one batch is answered, the requests
    waiting are sent to the children as soon as they are free; the answers are those of this process's embedder."""
    Session.create(BANKING_TASK, workspace=tmp_path / "ws", embedder=embedder, engine=None).close()
    texts = [MESSAGES[i % len(MESSAGES)] for i in range(120)]
    with Session.open(tmp_path / "ws", embedder=embedder) as here:
        expected = here.classify(texts, learn=False)
    sent_ahead = []
    with EmbedderProcess("default", workers=2) as children, \
            Session.open(tmp_path / "ws", embedder=children) as session:
        embed_soon = children.embed_soon
        monkeypatch.setattr(children, "embed_soon", lambda batch: sent_ahead.append(embed_soon(batch)) or sent_ahead[-1])
        with running(create_app(session)) as url:
            responses = post_concurrently(url, [{"text": text} for text in texts], concurrency=16)
        assert children.on_idle is None  # the service let go of its embedder when it stopped
    assert [r.status_code for r in responses] == [200] * len(texts)
    for response, prediction in zip(responses, expected, strict=True):
        [answer] = response.json()["answers"]
        assert answer["label"] == prediction.label
        assert answer["confidence"] == pytest.approx(prediction.confidence, abs=1e-4)
    assert any(sent_ahead)  # some batches were embedded while the one before them was still being answered


def test_a_list_of_texts_is_answered_in_order_with_the_top_labels_asked_for(banking, direct):
    with running(create_app(banking)) as url:
        response = httpx.post(f"{url}/v1/classify", json={"texts": MESSAGES[:5], "top": 1})
    assert response.status_code == 200
    answers = response.json()["answers"]
    assert [a["label"] for a in answers] == [direct[text].label for text in MESSAGES[:5]]
    assert all(len(a["top"]) == 1 and a["latency_ms"] >= 0 for a in answers) and response.json()["latency_ms"] > 0


def test_answers_are_in_headers_for_gateways_that_do_not_read_the_body(banking, direct, embedder):
    """Label, route and confidence per text in response headers, in order, as the body has them; a label in any
    script or with a comma survives percent-encoding."""
    with running(create_app(banking)) as url:
        one = httpx.post(f"{url}/v1/classify", json={"text": MESSAGES[0]})
        many = httpx.post(f"{url}/v1/classify", json={"texts": MESSAGES[:4]})
        schema = httpx.get(f"{url}/openapi.json").json()
    for response in (one, many):
        answers = response.json()["answers"]
        assert response.headers["x-labelcascade-label"].split(", ") == [a["label"] for a in answers]
        assert response.headers["x-labelcascade-route"].split(", ") == [a["route"] for a in answers] == ["fallback"] * len(answers)
        confidences = [float(c) for c in response.headers["x-labelcascade-confidence"].split(", ")]
        assert confidences == pytest.approx([a["confidence"] for a in answers], abs=5e-5)
    documented = schema["paths"]["/v1/classify"]["post"]["responses"]["200"]["headers"]
    assert {"X-Labelcascade-Label", "X-Labelcascade-Route", "X-Labelcascade-Confidence"} <= set(documented)

    task = Task(name="t", labels=["café, au lait", "退款"], allow_abstain=True, examples=[
        {"text": text, "label": label} for text, label in [("coffee with milk", "café, au lait"), ("a latte please", "café, au lait"),
                                                           ("I want my money back", "退款"), ("refund this order", "退款")]])
    session = Session.create(task, embedder=embedder, engine=None)
    texts = ["a latte with milk please", "I want a refund for this order"]
    with running(create_app(session)) as url:
        response = httpx.post(f"{url}/v1/classify", json={"texts": texts})
        session.set_policy(session.policy.model_copy(update={"abstain_threshold": 1.0}))  # every answer: none
        abstained = httpx.post(f"{url}/v1/classify", json={"text": "hello"})
    assert response.headers["x-labelcascade-label"] == "caf%C3%A9%2C%20au%20lait, %E9%80%80%E6%AC%BE"
    assert [a["label"] for a in response.json()["answers"]] == ["café, au lait", "退款"]
    assert (abstained.headers["x-labelcascade-label"], abstained.headers["x-labelcascade-route"]) == ("", "abstain")


def test_metrics_count_requests_by_endpoint_and_status_and_answers_by_route(banking):
    with running(create_app(banking)) as url, httpx.Client(base_url=url) as client:
        for text in MESSAGES[:5]:
            assert client.post("/v1/classify", json={"text": text}).status_code == 200
        assert client.post("/v1/classify", json={"texts": MESSAGES[5:8]}).status_code == 200
        assert client.post("/v1/classify", json={}).status_code == 422
        assert client.get("/nowhere").status_code == 404
        response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    exposition = response.text
    assert metric(exposition, "labelcascade_http_requests_total", endpoint="/v1/classify", status="200") == 6
    assert metric(exposition, "labelcascade_http_requests_total", endpoint="/v1/classify", status="422") == 1
    assert metric(exposition, "labelcascade_http_requests_total", endpoint="unmatched", status="404") == 1
    assert metric(exposition, "labelcascade_http_request_duration_seconds_count", endpoint="/v1/classify") == 7
    assert metric(exposition, "labelcascade_answers_total", route="fallback") == 8
    assert metric(exposition, "labelcascade_answers_total", route="llm") == 0
    assert metric(exposition, "labelcascade_classify_batch_texts_sum") == 8


def test_task_health_and_docs(banking):
    with running(create_app(banking)) as url, httpx.Client(base_url=url) as client:
        task = client.get("/v1/task").json()
        health = client.get("/healthz")
        docs, schema = client.get("/docs"), client.get("/openapi.json").json()
    assert task["name"] == "banking-support" and not task["multi_label"] and task["allow_abstain"]
    assert [label["name"] for label in task["labels"]] == banking.labels
    assert task["labels"][0]["description"] == "The customer is waiting for a card that has not arrived yet."
    assert task["policy"]["accept_threshold"] == banking.policy.accept_threshold
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    assert docs.status_code == 200 and "swagger" in docs.text.lower() and "cdn" not in docs.text
    assert {"/v1/classify", "/v1/feedback", "/v1/retrain", "/v1/task", "/healthz", "/metrics"} <= schema["paths"].keys()


BROWSER = shutil.which("chromium")


@pytest.mark.slow
def test_docs_render_in_a_headless_browser_with_the_network_unreachable(banking):
    """/docs was a blank page offline: FastAPI's Swagger UI loads its scripts from a CDN. A real browser, every host
    but 127.0.0.1 unresolvable, must render the operations; FastAPI's own page, in the same browser, renders none."""
    assert BROWSER, "Debian's chromium is needed: `make test` installs it (tools/install_chromium.sh)"

    def rendered(url: str) -> str:
        browser = subprocess.run(
            [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", "--virtual-time-budget=15000",
             "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", url],
            capture_output=True, text=True, timeout=120)
        assert browser.returncode == 0, browser.stderr[-2000:]
        return browser.stdout

    with running(create_app(banking)) as url:
        page = rendered(f"{url}/docs")
        redoc = rendered(f"{url}/redoc")
    assert 'class="swagger-ui"' in page and "opblock" in page  # Swagger UI drew the operations
    assert all(path in page for path in ("/v1/classify", "/v1/feedback", "/v1/task"))
    assert "api-content" in redoc and "/v1/classify" in redoc  # ReDoc drew it too (the served page has neither)
    plain = FastAPI()
    plain.get("/v1/classify")(lambda: None)
    with running(plain) as url:
        assert "opblock" not in rendered(f"{url}/docs")  # the CDN page: nothing drawn without the network


def test_feedback_stores_a_review_example_and_retrains_only_when_asked(embedder):
    session = Session.create(BANKING_TASK, embedder=embedder, engine=None)
    text = "My card's frozen, what can I do?"  # the seed examples alone answer lost_or_stolen_card
    with running(create_app(session)) as url, httpx.Client(base_url=url) as client:
        before = client.post("/v1/classify", json={"text": text}).json()["answers"][0]["label"]
        stored = client.post("/v1/feedback", json={"text": text, "label": "pin_blocked"})
        unchanged = client.post("/v1/classify", json={"text": text}).json()["answers"][0]["label"]
        retrained = client.post("/v1/feedback", json={"text": text, "labels": ["pin_blocked"], "retrain": True})
        wait_for_retrain(client)
        after = client.post("/v1/classify", json={"text": text}).json()["answers"][0]["label"]
        unknown = client.post("/v1/feedback", json={"text": "what is the weather", "label": "weather"})
        two = client.post("/v1/feedback", json={"text": text, "labels": ["pin_blocked", "change_pin"]})
    assert stored.status_code == 200 and stored.json()["source"] == "review" and not stored.json()["retraining"]
    assert retrained.json()["retraining"] and retrained.json()["id"] == stored.json()["id"]
    [example] = session.store.get([stored.json()["id"]])
    assert (example.text, example.labels, example.source.value) == (text, ("pin_blocked",), "review")
    assert (before, unchanged, after) == ("lost_or_stolen_card", "lost_or_stolen_card", "pin_blocked")
    assert unknown.status_code == 422
    message = unknown.json()["detail"][0]["msg"]
    assert "unknown label 'weather'" in message and "card_arrival" in message and "terminate_account" in message
    assert two.status_code == 422 and "single-label" in two.json()["detail"][0]["msg"]
    assert len(session.store) == 81  # the 80 seed examples and the one reviewed text
    session.close()


def test_the_retrain_endpoint_retrains_in_the_background_and_refuses_a_body_retrain_it_cannot_do(embedder):
    """POST /v1/retrain starts the retrain feedback's "retrain": true starts; a body retrain on a workspace without
    a tuned body, or a tuning limit without one, is refused at the door with what to do."""
    session = Session.create(BANKING_TASK, embedder=embedder, engine=None)
    session.add_examples(["My card's frozen, what can I do?"], ["pin_blocked"])  # stored, not yet trained on
    with running(create_app(session)) as url, httpx.Client(base_url=url, timeout=60) as client:
        old = client.get("/v1/task").json()
        started = client.post("/v1/retrain")
        new = wait_for_retrain(client)
        not_tuned = client.post("/v1/retrain", json={"body": True})
        no_body = client.post("/v1/retrain", json={"tuning_seconds": 30})
        negative = client.post("/v1/retrain", json={"body": True, "tuning_seconds": 0})
    assert started.status_code == 202 and started.json() == {"retraining": True, "body": False}
    assert new["fallback"] != old["fallback"] and new["embedder"] == old["embedder"] == embedder.id
    assert not_tuned.status_code == 422
    assert not_tuned.json()["detail"][0]["loc"] == ["body", "body"]
    assert "create the workspace with embedder 'tuned'" in not_tuned.json()["detail"][0]["msg"]
    assert no_body.status_code == 422 and "give it with \"body\": true" in no_body.json()["detail"][0]["msg"]
    assert negative.status_code == 422
    assert session.cascade.fallback.fingerprint() == new["fallback"]
    session.close()


def wait_for_retrain(client: httpx.Client, timeout: float = 120) -> dict:
    """/v1/task once no retrain is running in the background."""
    deadline = time.monotonic() + timeout
    while (task := client.get("/v1/task").json())["retraining"]:
        assert time.monotonic() < deadline, "the background retrain did not end"
        time.sleep(0.05)
    return task


def test_a_retrain_runs_beside_the_answers_and_is_swapped_in_whole(embedder):
    """Retraining on every stored example used to run on the worker thread and stall every request behind it (80 s
    on 2,000 examples). Now requests are answered, by the old model, while it trains; the new one is swapped in
    between batches, and /v1/task names the model answering."""
    texts, labels = few_shot("banking77", 6)  # 462 examples of 77 labels: a fit of seconds
    session = Session.create(Task.from_labels(sorted(set(labels))), embedder=embedder, engine=None)
    session.add_examples(texts, labels, retrain=True)
    questions = held_out("banking77", 16)[0]
    with running(create_app(session)) as url, httpx.Client(base_url=url, timeout=60) as client:
        old = client.get("/v1/task").json()["fallback"]
        began_retrain = time.perf_counter()
        started = client.post("/v1/feedback", json={"text": "my card got eaten by the ATM", "label": "card_swallowed",
                                                    "retrain": True}).json()
        during = []  # classify requests answered from start to end while /v1/task still said "retraining"
        while client.get("/v1/task").json()["retraining"]:
            began = time.perf_counter()
            answers = client.post("/v1/classify", json={"texts": questions}).json()["answers"]
            if client.get("/v1/task").json()["retraining"]:
                during.append((time.perf_counter() - began, [a["label"] for a in answers]))
        new = wait_for_retrain(client)["fallback"]
        retrain_seconds = time.perf_counter() - began_retrain
        after = [a["label"] for a in client.post("/v1/classify", json={"texts": questions}).json()["answers"]]
    assert started["retraining"] and new != old
    assert len(during) >= 3, f"only {len(during)} requests were answered in the {retrain_seconds:.1f} s the model trained"
    assert max(seconds for seconds, _ in during) < retrain_seconds / 3  # not held up until the retrain ended
    assert {tuple(answer) for _, answer in during} == {tuple(during[0][1])}  # the old model, whole, all along
    assert session.cascade.fallback.fingerprint() == new and len(after) == 16
    session.close()


@pytest.mark.slow
def test_a_body_retrain_through_the_service_answers_with_the_old_body_until_its_swap_then_with_the_new(tmp_path):
    """POST /v1/retrain {"body": true} on a tuned workspace served with the embedder in child processes (as
    `serve` does): refused while another process holds the body lock or a retrain runs; the old body and model
    answer until the swap; after it the service's children embed with the new body and answer as the workspace
    opened afresh does. A service stopped during a body retrain stops it (not minutes later) and keeps its body."""
    texts, labels = few_shot("sst2", 8)
    workspace = tmp_path / "ws"
    Session.create(Task.from_labels(sorted(set(labels))), workspace=workspace, embedder="tuned", tuning_seconds=15,
                   engine=None, examples=(texts, labels)).close()
    questions = held_out("sst2", 24, seed=3)[0]
    children = EmbedderProcess(Workspace.open(workspace).embedder_spec, workers=2)
    session = Session.open(workspace, engine=None, embedder=children)
    with running(create_app(session)) as url, httpx.Client(base_url=url, timeout=120) as client:
        old = client.get("/v1/task").json()
        before = answered(client, questions)
        claim = Workspace.open(workspace).claim_body_lock()  # another process's body retrain, as far as the lock goes
        locked = client.post("/v1/retrain", json={"body": True})
        claim.release()
        started = client.post("/v1/retrain", json={"body": True, "tuning_seconds": 15})
        twice = client.post("/v1/retrain", json={"body": True})
        during, tuning = [], []
        while (polled := client.get("/v1/task").json())["retraining"]:
            tuning.append(polled["body_tuning"])
            answers = answered(client, questions)
            if client.get("/v1/task").json()["retraining"]:
                during.append(answers)
        after = answered(client, questions)
        task = client.get("/v1/task").json()
        body_dir = json.loads((workspace / "settings.json").read_text())["body_dir"]
        for text, label in zip(*few_shot("sst2", 8, seed=5), strict=True):  # more pairs: minutes of tuning
            client.post("/v1/feedback", json={"text": text, "label": label})
        client.post("/v1/retrain", json={"body": True, "tuning_seconds": 300})
        time.sleep(30)  # into its tuning (e5 is rebuilt first): the service stops while it tunes
        stopping = time.perf_counter()
    stopped_in = time.perf_counter() - stopping
    assert stopped_in < 25, f"the service took {stopped_in:.0f} s to stop during a body retrain"
    assert locked.status_code == 409 and "another body retrain is running" in locked.json()["detail"]
    assert started.status_code == 202 and started.json() == {"retraining": True, "body": True}
    assert twice.status_code == 409 and "a retrain is running" in twice.json()["detail"]
    assert during and all(answers == before for answers in during)  # the old body and model, whole, all along
    progress = [(step["pairs_trained"], step["pairs_planned"]) for step in tuning if step is not None]
    assert progress and progress == sorted(progress) and 0 < progress[-1][0] <= progress[-1][1]
    assert task["body_tuning"] is None
    assert task["embedder"] != old["embedder"] and task["embedder"].endswith(body_dir.removeprefix("body-"))
    assert task["fallback"] != old["fallback"]
    assert isinstance(session.embedder, EmbedderProcess) and session.embedder is not children
    assert json.loads((workspace / "settings.json").read_text())["body_dir"] == body_dir  # the stopped one: no swap
    assert body_dir in {path.name for path in workspace.glob("body*")}  # beside its stray folder
    Workspace.open(workspace).claim_body_lock().release()  # the stopped retrain let go of the lock
    session.close()
    with Session.open(workspace, engine=None) as reopened:  # the new body in this process, not in children
        fresh = [reopened.classify(question) for question in questions]
    assert [label for label, _ in after] == [prediction.label for prediction in fresh]
    np.testing.assert_allclose([confidence for _, confidence in after],
                               [prediction.confidence for prediction in fresh], atol=1e-4)


def answered(client: httpx.Client, texts: list[str]) -> list[tuple[str, float]]:
    """Each text's label and confidence, as the service answers them."""
    answers = client.post("/v1/classify", json={"texts": texts}).json()["answers"]
    return [(answer["label"], answer["confidence"]) for answer in answers]


def test_learning_in_the_service_retrains_in_the_background(embedder, gemma):
    """LLM answers are stored as the service classifies; after `retrain_every` of them the retrain starts on its own
    thread (the session's auto_retrain is off while the service runs, and back on after)."""
    session = Session.create(BANKING_TASK, embedder=embedder, engine=gemma,
                             policy=Policy(accept_threshold=1.0, learn_threshold=0.0, retrain_every=2))
    texts = banking_messages()[0][:4]
    with running(create_app(session)) as url, httpx.Client(base_url=url, timeout=300) as client:
        old = client.get("/v1/task").json()["fallback"]
        assert not session.auto_retrain
        routes = [a["route"] for a in client.post("/v1/classify", json={"texts": texts}).json()["answers"]]
        new = wait_for_retrain(client)["fallback"]
    assert routes == ["llm"] * 4 and new != old and session.auto_retrain
    assert len(session.store) == 84 and not session.retrain_due
    session.close()


def test_feedback_does_not_overrule_gold_labels_and_is_rate_limited(embedder):
    """Eight relabels of gold seed texts and a retrain once flipped an intent's answers. Gold labels now stand
    against feedback (409, naming the way to change them), and feedback is capped per minute (429)."""
    session = Session.create(BANKING_TASK, embedder=embedder, engine=None)
    seed_text, (seed_label,) = session.task.seed_examples()[0]  # a card_arrival example
    count = len(session.store)
    with running(create_app(session, max_feedback_per_minute=3)) as url, httpx.Client(base_url=url) as client:
        overrule = client.post("/v1/feedback", json={"text": seed_text, "label": "terminate_account"})
        agree = client.post("/v1/feedback", json={"text": seed_text, "label": seed_label})
        new = client.post("/v1/feedback", json={"text": "my card melted in the sun", "label": "card_arrival"})
        flood = client.post("/v1/feedback", json={"text": "one more text", "label": "card_arrival"})
    assert overrule.status_code == 409 and "gold label" in overrule.text and "--review" in overrule.text
    assert agree.status_code == 200 and new.status_code == 200
    assert flood.status_code == 429 and int(flood.headers["Retry-After"]) >= 1 and "3 feedback requests" in flood.text
    assert session.store.find([seed_text])[seed_text].labels == (seed_label,)
    assert len(session.store) == count + 1 and "one more text" not in session.store.find(["one more text"])
    session.close()


def test_api_key_guards_every_endpoint_but_healthz(banking):
    with running(create_app(banking, api_key="s3cret")) as url, httpx.Client(base_url=url) as client:
        assert client.get("/healthz").status_code == 200
        for method, path in [("GET", "/v1/task"), ("GET", "/metrics"), ("POST", "/v1/classify"),
                             ("POST", "/v1/feedback"), ("POST", "/v1/retrain")]:
            assert client.request(method, path, json={"text": "hi"}).status_code == 401
        assert client.get("/v1/task", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/v1/task", headers={"X-API-Key": "wrong"}).status_code == 401
        refused = client.post("/v1/classify", json={"text": "my card got stolen"})
        assert refused.status_code == 401 and "Bearer" in refused.json()["detail"]
        assert client.get("/v1/task", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.get("/metrics", headers={"X-API-Key": "s3cret"}).status_code == 200
        answered = client.post("/v1/classify", json={"text": "my card got stolen"}, headers={"X-API-Key": "s3cret"})
        assert answered.json()["answers"][0]["label"] == "lost_or_stolen_card"


def test_limits_and_malformed_requests_are_refused_with_the_reason(banking):
    with running(create_app(banking, max_texts=4, max_text_chars=100)) as url, httpx.Client(base_url=url) as client:

        def refused(body: dict, status: int = 422) -> str:
            response = client.post("/v1/classify", json=body)
            assert response.status_code == status, response.text
            return response.text

        assert "exactly one of 'text'" in refused({"text": "a card", "texts": ["a card"]})
        assert "exactly one of 'text'" in refused({"top": 2})
        assert "5 texts; at most 4" in refused({"texts": ["my card"] * 5})
        assert "texts[1] has 101 characters; at most 100" in refused({"texts": ["my card", "x" * 101]})
        assert "text is empty" in refused({"text": "   "})
        assert "extra" in refused({"text": "my card", "language": "en"})
        assert "Content Too Large" in refused({"text": "x" * 1_100_000}, status=413)
        malformed = client.post("/v1/classify", content=b"{not json", headers={"Content-Type": "application/json"})
        assert malformed.status_code == 422


def test_a_failing_classifier_answers_500_with_a_message_and_no_traceback(embedder):
    untrained = Session.create(Task.from_labels(["a", "b"]), embedder=embedder, engine=None)  # no fallback yet: classify raises
    with running(create_app(untrained)) as url:
        response = httpx.post(f"{url}/v1/classify", json={"text": "my card got stolen"})
        assert httpx.get(f"{url}/healthz").status_code == 200
    assert response.status_code == 500
    assert "NotFittedError" in response.json()["detail"] and "Traceback" not in response.text
    untrained.close()


def test_the_service_answers_with_what_commands_in_another_terminal_saved(embedder, tmp_path):
    """People curate a served workspace from the command line: `add-label` and `add` retrain its fallback and save
    it. The running service takes that up before its next batch (no restart): the new label answers, /v1/task lists
    it, feedback may use it, and the service's own retrain keeps it."""
    workspace = tmp_path / "ws"
    session = Session.create(BANKING_TASK, workspace=workspace, embedder=embedder, engine=None)
    script = str(Path(sys.executable).with_name("labelcascade"))
    text = "I'll be in Italy for two weeks, will my card still work there?"
    (tmp_path / "more.csv").write_text("text,label\n\"flying to Rome tomorrow, will my card work?\",travel_notice\n")
    with running(create_app(session)) as url, httpx.Client(base_url=url, timeout=60) as client:
        before = client.post("/v1/classify", json={"text": text}).json()["answers"][0]["label"]
        old = client.get("/v1/task").json()["fallback"]
        examples = [arg for example in ["I'm going abroad next week, do I need to tell you?", "how do I set a travel "
                    "notice on my card", "will my card work when I travel to Spain?"] for arg in ("-e", example)]
        for command in (["add-label", str(workspace), "travel_notice", *examples],
                        ["add", str(workspace), str(tmp_path / "more.csv")]):
            done = subprocess.run([script, *command], capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stderr
        after = client.post("/v1/classify", json={"text": text}).json()["answers"][0]
        task = client.get("/v1/task").json()
        feedback = client.post("/v1/feedback", json={"text": "off to Peru, will my card work?",
                                                     "label": "travel_notice", "retrain": True})
        retrained = wait_for_retrain(client)
        again = client.post("/v1/classify", json={"text": text}).json()["answers"][0]["label"]
    assert before != "travel_notice" and after["label"] == "travel_notice" == again
    assert task["labels"][-1]["name"] == "travel_notice" and task["fallback"] != old
    assert feedback.status_code == 200 and retrained["fallback"] != task["fallback"]
    session.close()
    with Session.open(workspace, embedder=embedder, engine=None) as reopened:
        assert reopened.labels[-1] == "travel_notice" and len(reopened.store) == 80 + 3 + 1 + 1
        assert reopened.cascade.fallback.fingerprint() == retrained["fallback"]


def test_a_store_re_embedded_by_another_process_is_answered_503_saying_to_restart(embedder):
    """Another process's body retrain re-embeds the store (`ExampleStore.reembed`, here from a second connection);
    the service's connection is refused its next store access, which the caller gets as a 503 that says what to
    do, not a 500."""
    session = Session.create(BANKING_TASK, embedder=embedder, engine=None)
    with running(create_app(session)) as url, httpx.Client(base_url=url) as client:
        other = ExampleStore.open(session.path / "store")
        other.reembed("another-body", lambda texts: embedder.embed(texts))
        other.close()
        refused = client.post("/v1/feedback", json={"text": "my card is stuck in the machine", "label": "pin_blocked"})
    assert refused.status_code == 503
    assert "another process re-embedded it" in refused.json()["detail"]
    assert "Restart the service" in refused.json()["detail"]
    session.close()


def test_serve_opens_the_workspace_and_binds_localhost_by_default(embedder, tmp_path, monkeypatch):
    """... and embeds in a process of its own, whose vectors answer as this process's would; numpy's BLAS runs on
    one thread while it serves (see service.py), as many as before once it stops."""
    Session.create(BANKING_TASK, workspace=tmp_path / "ws", embedder=embedder, engine=None).close()
    seen = {}
    def blas_threads() -> set[int]:
        return {pool["num_threads"] for pool in threadpoolctl.threadpool_info() if pool["user_api"] == "blas"}

    before = blas_threads()

    def run_instead(app: FastAPI, *, host: str, port: int) -> None:
        seen.update(host=host, port=port)
        seen["blas_threads"] = blas_threads()
        with running(app) as url:
            seen["task"] = httpx.get(f"{url}/v1/task").json()["name"]
            seen["answer"] = httpx.post(f"{url}/v1/classify", json={"text": "my card got stolen"}).json()["answers"][0]

    monkeypatch.setattr(uvicorn, "run", run_instead)
    serve(tmp_path / "ws", embedder_workers=1)
    answer = seen.pop("answer")
    assert seen == {"host": "127.0.0.1", "port": 8000, "task": "banking-support", "blas_threads": {1}}
    assert blas_threads() == before
    with Session.open(tmp_path / "ws", embedder=embedder) as here:
        expected = here.classify(["my card got stolen"], learn=False)[0]
    assert answer["label"] == expected.label and answer["confidence"] == pytest.approx(expected.confidence, abs=1e-5)


@pytest.mark.slow
def test_a_service_stopped_by_sigterm_saves_what_it_stored_and_ends_as_killed_by_it(embedder, tmp_path, caplog):
    """uvicorn raises SIGTERM again after its graceful stop; with Python's default handler the process ended there,
    before `serve` closed the session, so the examples stored while it ran were missing from the saved FAISS index."""
    Session.create(BANKING_TASK, workspace=tmp_path / "ws", embedder=embedder, engine=None).close()
    server, url = serving_process(tmp_path / "ws", "--embedder-workers", "1")
    try:
        stored = httpx.post(f"{url}/v1/feedback", json={"text": "my card is frozen", "label": "pin_blocked"})
        assert stored.status_code == 200
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == -signal.SIGTERM, server.stderr.read().decode()
    finally:
        server.kill()
    with caplog.at_level("INFO", logger="labelcascade.retrieval.store"), \
            ExampleStore.open(tmp_path / "ws" / "store") as store:
        assert store.find(["my card is frozen"])["my card is frozen"].labels == ("pin_blocked",)
        assert len(store) == 81
    assert "rebuilding" not in caplog.text  # the index on disk held the new example


def test_serve_warns_that_an_uncalibrated_workspace_asks_the_llm_about_every_unsure_text(embedder, tmp_path,
                                                                                         monkeypatch, caplog):
    Session.create(BANKING_TASK, workspace=tmp_path / "ws", embedder=embedder).close()  # the embedded LLM: the default
    monkeypatch.setattr(uvicorn, "run", lambda app, *, host, port: None)
    with caplog.at_level("WARNING", logger="labelcascade.service"):
        serve(tmp_path / "ws", embedder_workers=1)
    assert "is not calibrated, so the LLM answers every text the fallback is less than 90% sure of" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="labelcascade.service"):
        serve(tmp_path / "ws", engine=None, embedder_workers=1)  # the fallback alone: nothing to calibrate it against
    assert "not calibrated" not in caplog.text


def test_unsure_texts_are_answered_by_the_embedded_llm_through_the_service(embedder, gemma):
    """The real Gemma 3 270M through llama.cpp; an accept threshold of 1 sends every text to it."""
    session = Session.create(BANKING_TASK, embedder=embedder, engine=gemma, policy=Policy(accept_threshold=1.0, learn=False))
    texts = MESSAGES[:6]
    with running(create_app(session)) as url:
        responses = post_concurrently(url, [{"text": text} for text in texts], concurrency=6)
        exposition = httpx.get(f"{url}/metrics").text
    answers = [response.json()["answers"][0] for response in responses]
    assert [a["route"] for a in answers] == ["llm"] * len(texts)
    assert all(a["label"] in session.labels and a["evidence"] for a in answers)
    assert metric(exposition, "labelcascade_answers_total", route="llm") == len(texts)
    session.close()
