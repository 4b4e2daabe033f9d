#!/usr/bin/env python
"""The HTTP service against calling the session directly, side by side in one run, on a fallback-only workspace.

    .venv/bin/python bench/service.py                        # 3 rounds (~3 min, 2 cores)
    .venv/bin/python bench/service.py --rounds 1 --no-markdown   # smoke run

What a chat assistant gets from `labelcascade serve`: a workspace of banking77 (77 intents, 8 gold examples each,
seed 0 of bench/common.py, the English embedder, no LLM) answers banking77 test texts.
- "direct batch": `session.classify(texts)` of --texts texts in one call, in this process: the ceiling.
- "direct, 32 texts per call": the same texts in calls of 32, the most one batch of the service holds at
  concurrency 32 (one text per request): what batching alone allows, before any HTTP.
- "direct batch, the body in torch": the direct batch with all-MiniLM-L6-v2 in sentence-transformers, as it
  answers where its onnxruntime graph cannot be made (and as every setting ran before 2026-12-04).
- "service, concurrency c": `labelcascade serve` as its own process on 127.0.0.1 (with its embedder processes);
  wrk (Debian's `wrk`, a C load generator: `apt-get install wrk`) keeps c requests of one text each in flight on
  keep-alive connections for --seconds after a warm-up; requests/s, and the p50/p99 of each request's wall time as
  the client saw it.
The client runs on the same 2 cores as the server, as a chat assistant beside it would; wrk rather than a Python
client because a Python HTTP client's own CPU time per request (3-6 ms for httpx, measured here) would be taken from
the server on the same cores. Each round measures every
setting once, in turn; the table gives the median over rounds (and the range), and the ratio of the service's
requests/s to the direct texts/s, and the CPU time per request of the server process and of the client.
Results: bench/results/service.json and the "## HTTP service (bench/service.py)" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from labelcascade import Session, Task
from labelcascade.retrieval import SentenceTransformerEmbedder
from labelcascade.retrieval.embedders import default_model_dir

from common import DEFAULT_DATA, MARKDOWN, REPO, log, machine_and_load, per_class_draw, publish, read_jsonl, test_sample

DEFAULT_OUT = REPO / "bench" / "results" / "service.json"
SECTION_HEADING = "## HTTP service (bench/service.py)"
CONCURRENCY = (1, 8, 32)
WARM_UP_S = 3


def workspace(path: Path, data: Path) -> float:
    """A new workspace as `init` makes it (text_features 'auto'); returns the TF-IDF n-gram weight it chose."""
    train = read_jsonl(data / "banking77" / "train.jsonl")
    picked = per_class_draw(train, 0, "banking77", draw=8)
    task = Task.build({"name": "banking77", "labels": [
        {"name": label, "examples": [train[i]["text"] for i in indices]} for label, indices in picked.items()]})
    with Session.create(task, workspace=path, embedder="default", engine=None) as session:
        return session.cascade.fallback.text_weight_


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def direct(path: Path, texts: list[str], per_call: int | None = None, embedder=None) -> float:
    """texts/s of `classify` calls over all the texts, `per_call` texts at a time (None: one call), after a
    warm-up call; with the workspace's embedder, or `embedder`."""
    per_call = per_call or len(texts)
    with Session.open(path, engine=None, embedder=embedder) as session:
        session.classify(texts[:32], learn=False)
        began = time.perf_counter()
        for start in range(0, len(texts), per_call):
            session.classify(texts[start : start + per_call], learn=False)
        return len(texts) / (time.perf_counter() - began)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured_load(url: str, server: int, bodies: Path, concurrency: int, seconds: float) -> dict:
    """`load`, plus the CPU time per request that the server used (its main process, which answers HTTP and runs the
    classifier's head, and its embedder processes, apart) and the client used, and the mean texts per classifier
    call (the service's /metrics)."""
    embedders = children(server)
    main_before, embedders_before = cpu_seconds(server), sum(cpu_seconds(pid) for pid in embedders)
    batches_before = batch_counts(url)
    result = load(url, bodies, concurrency, seconds)
    per_request = 1000 / result["requests"]
    result["main_cpu_ms"] = (cpu_seconds(server) - main_before) * per_request
    result["embedders_cpu_ms"] = (sum(cpu_seconds(pid) for pid in embedders) - embedders_before) * per_request
    result["server_cpu_ms"] = result["main_cpu_ms"] + result["embedders_cpu_ms"]
    texts, calls = (after - before for after, before in zip(batch_counts(url), batches_before, strict=True))
    result["texts_per_batch"] = texts / calls if calls else 0.0
    return result


def batch_counts(url: str) -> tuple[float, float]:
    """Texts classified and classifier calls so far, from the service's Prometheus metrics."""
    found = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name in ("labelcascade_classify_batch_texts_sum", "labelcascade_classify_batch_texts_count"):
                found[sample.name] = sample.value
    return found["labelcascade_classify_batch_texts_sum"], found["labelcascade_classify_batch_texts_count"]


def children(pid: int) -> list[int]:
    """The server's child processes (its embedder processes)."""
    found = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in found.read_text().split()] if found.exists() else []


LUA = """
counter = 0
request = function()
  counter = counter + 1
  return wrk.format("POST", "/v1/classify", {["Content-Type"] = "application/json"}, bodies[(counter % #bodies) + 1])
end
done = function(summary, latency, requests)
  io.write(string.format("RESULT %d %d %d %d %d %d %d\\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), summary.errors.status, summary.errors.timeout,
    summary.errors.connect + summary.errors.read + summary.errors.write))
end
"""


def wrk_script(texts: list[str], folder: Path) -> Path:
    """wrk's Lua script: POST one text per request, cycling through `texts`, and print what was measured."""
    bodies = ",\n".join("[==[" + json.dumps({"text": text}) + "]==]" for text in texts)
    path = folder / "load.lua"
    path.write_text("bodies = {\n" + bodies + "\n}\n" + LUA)
    return path


def load(url: str, script: Path, concurrency: int, seconds: float) -> dict:
    """requests/s, p50 and p99 (ms) with `concurrency` one-text requests always in flight for `seconds`, from wrk
    (one thread, one keep-alive connection per request in flight); the client's CPU time per request."""
    began = os.times()
    run = subprocess.run(["wrk", "-t1", f"-c{concurrency}", f"-d{seconds:g}s", "--timeout", "30s", "-s", str(script),
                          url], capture_output=True, text=True, check=True)
    ended = os.times()
    requests, duration_us, p50_us, p99_us, status, timeouts, socket = map(
        int, next(line for line in run.stdout.splitlines() if line.startswith("RESULT ")).split()[1:])
    if status or timeouts or socket:
        raise SystemExit(f"wrk saw errors at concurrency {concurrency}: {status} non-2xx, {timeouts} timeouts, "
                         f"{socket} socket errors\n{run.stdout}")
    client = (ended.children_user + ended.children_system) - (began.children_user + began.children_system)
    return {"requests": requests, "requests_per_s": requests / (duration_us / 1e6), "p50_ms": p50_us / 1000,
            "p99_ms": p99_us / 1000, "client_cpu_ms": client / requests * 1000}


def serve(path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).with_name("labelcascade")), "serve", str(path), "--port",
                               str(port), "--engine", "none", "--max-texts", "256"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return server, url
        except httpx.TransportError:
            time.sleep(0.3)
    server.kill()
    raise SystemExit("the service did not start within 120 s")


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--texts", type=int, default=1000, help="texts of the direct batch")
    parser.add_argument("--seconds", type=float, default=20, help="seconds of load per service measurement")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--no-markdown", action="store_true")
    args = parser.parse_args()

    texts = [row["text"] for row in test_sample(read_jsonl(args.data / "banking77" / "test.jsonl"), args.texts)]
    started = machine_and_load()
    rounds = []
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "ws"
        text_weight = workspace(path, args.data)
        # the same body in sentence-transformers, as it answers where its onnxruntime graph cannot be made
        torch_body = SentenceTransformerEmbedder(default_model_dir(), name="all-MiniLM-L6-v2")
        script = wrk_script(texts, Path(folder))
        server, url = serve(path)
        try:
            for number in range(args.rounds):
                measured = {"direct_texts_per_s": direct(path, texts),
                            "direct_32_texts_per_s": direct(path, texts, per_call=32),
                            "direct_torch_texts_per_s": direct(path, texts, embedder=torch_body)}
                load(url, script, 8, WARM_UP_S)
                for concurrency in CONCURRENCY:
                    measured[f"c{concurrency}"] = measured_load(url, server.pid, script, concurrency, args.seconds)
                rounds.append(measured)
                log(f"round {number + 1}: {measured}")
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(timeout=60)

    direct_rate = [r["direct_texts_per_s"] for r in rounds]
    lines = [
        SECTION_HEADING, "",
        f"Run {dt.date.today().isoformat()} on {started['machine']} (load {started['load_start']} at the start), "
        f"{len(rounds)} rounds; banking77, 77 labels x 8 gold examples (seed 0), all-MiniLM-L6-v2 "
        f"({f'TF-IDF n-grams beside it at weight {text_weight:g}' if text_weight else 'no TF-IDF n-grams'}, as "
        "`text_features='auto'` chose), no LLM; one text "
        f"per request, {args.seconds:g} s of load per setting after {WARM_UP_S} s of warm-up; wrk on the same machine. "
        "Median over rounds (range).", "",
        "| setting | texts/s or requests/s | ratio to direct | p50 ms | p99 ms | server CPU ms/request (main + embedders) | client CPU ms/request | texts per batch |",
        "|---|---|---|---|---|---|---|---|",
        f"| direct batch (`session.classify` of {args.texts} texts) | {spread(direct_rate)} | 1.00 | - | - | - | - | - |",
        f"| direct, 32 texts per call (the most a batch holds at concurrency 32) | "
        f"{spread([r['direct_32_texts_per_s'] for r in rounds])} | "
        f"{statistics.median([r['direct_32_texts_per_s'] / r['direct_texts_per_s'] for r in rounds]):.2f} | - | - | - | - | - |",
        f"| direct batch, the body in torch (sentence-transformers) instead of onnxruntime | "
        f"{spread([r['direct_torch_texts_per_s'] for r in rounds])} | "
        f"{statistics.median([r['direct_torch_texts_per_s'] / r['direct_texts_per_s'] for r in rounds]):.2f} | - | - | - | - | - |",
    ]
    summary = {}
    for concurrency in CONCURRENCY:
        key = f"c{concurrency}"
        rate = [r[key]["requests_per_s"] for r in rounds]
        ratio = statistics.median([r[key]["requests_per_s"] / r["direct_texts_per_s"] for r in rounds])
        p50 = statistics.median(r[key]["p50_ms"] for r in rounds)
        p99 = statistics.median(r[key]["p99_ms"] for r in rounds)
        cpu = {f"{side}_cpu_ms": statistics.median(r[key][f"{side}_cpu_ms"] for r in rounds)
               for side in ("server", "main", "embedders", "client")}
        batch = statistics.median(r[key]["texts_per_batch"] for r in rounds)
        summary[key] = {"requests_per_s": statistics.median(rate), "ratio": ratio, "p50_ms": p50, "p99_ms": p99, **cpu,
                        "texts_per_batch": batch}
        lines.append(f"| service, concurrency {concurrency} | {spread(rate)} | {ratio:.2f} | {p50:.0f} | {p99:.0f} | "
                     f"{cpu['server_cpu_ms']:.1f} ({cpu['main_cpu_ms']:.1f} + {cpu['embedders_cpu_ms']:.1f}) | "
                     f"{cpu['client_cpu_ms']:.1f} | {batch:.1f} |")
    cores, direct_median = os.cpu_count() or 1, statistics.median(direct_rate)
    core_ms = cores * 1000 / direct_median
    lines += ["", f"The direct batch uses {core_ms:.1f} ms of CPU time per text ({cores} cores busy); the "
              f"service uses {summary['c32']['server_cpu_ms']:.1f} ms per one-text request at concurrency 32 and the "
              f"client {summary['c32']['client_cpu_ms']:.1f} ms, on the same cores."]
    busy = summary["c32"]["server_cpu_ms"] + summary["c32"]["client_cpu_ms"]
    ceiling = cores * 1000 / busy
    lines += ["", f"What bounds concurrency 32: at {busy:.1f} ms of CPU per request (server and client), {cores} "
              f"fully busy cores would answer {ceiling:.0f} requests/s, {ceiling / direct_median:.2f} of the direct "
              f"batch; the service reached {summary['c32']['requests_per_s'] / ceiling:.0%} of that (the rest: cores "
              "left idle, while one embedder process waits for the other's run or a batch for its texts). A ratio of "
              f"0.80 needs both cores busy at <= {core_ms / 0.8:.1f} ms per request."]
    direct_32 = statistics.median(r["direct_32_texts_per_s"] for r in rounds)
    lines += ["", f"At concurrency 32 a batch holds 32 texts at most: in-process calls of 32 texts run {direct_32:.0f} "
              f"texts/s, and the service answers {summary['c32']['requests_per_s']:.0f} requests/s "
              f"({summary['c32']['requests_per_s'] / direct_32:.2f} of that). One call of {args.texts} texts sorts "
              "them by length and runs full batches of similar lengths, which a small batch of mixed lengths cannot; "
              "the service makes up part of that by embedding in one-thread child processes, each batch cut into runs "
              "of about equal cost, and by embedding the next batch while the previous one is answered "
              "(src/labelcascade/service.py, \"Why the next batch is embedded ahead\")."]
    ratio_32, p99_8 = summary["c32"]["ratio"], summary["c8"]["p99_ms"]
    lines += ["", f"Issue 16's bar: concurrency 32 at >= 0.80 of the direct batch: {ratio_32:.2f}, "
              f"{'PASS' if ratio_32 >= 0.8 else 'FAIL'}; p99 at concurrency 8 under 150 ms: {p99_8:.0f} ms, "
              f"{'PASS' if p99_8 < 150 else 'FAIL'}."]
    lines.append("")
    result = {"date": dt.date.today().isoformat(), **started, "load_end": round(os.getloadavg()[0], 1),
              "rounds": rounds, "summary": summary, "direct_texts_per_s": direct_median, "text_weight": text_weight}
    publish(result, args.out, "\n".join(lines), markdown=None if args.no_markdown else MARKDOWN, heading=SECTION_HEADING)


if __name__ == "__main__":
    main()
