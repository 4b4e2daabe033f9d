#!/usr/bin/env python
"""Benchmark of a labelling job as a user runs it: `labelcascade label` over a JSONL file of ag_news texts.

    .venv/bin/python bench/job.py                  # 10,000 rows (the LLM arm takes about an hour on 2 cores)
    .venv/bin/python bench/job.py --rows 500       # a shorter run
    .venv/bin/python bench/job.py --arms "fallback only" "fallback only, ray 1" "fallback only, ray 2"
    .venv/bin/python bench/job.py --rows 2000 --arms cascade "cascade, transformers bfloat16"   # after tools/vllm_server.sh setup

Setup: a workspace with 8 gold examples per class of ag_news (bench/fallback.py's 8/class set, seed 0), calibrated
on 200 labelled training texts outside the pool (random.Random(7); target precision 0.95, LLM budget 0.4, the
embedded Gemma 3 270M through llama.cpp). The job's rows are --rows further texts: the rest of the training split in
a fixed random order, then the test split in file order (ag_news has 10,001 training texts), as JSONL with an id.

Two arms, each in its own copy of the workspace (so neither sees the other's answer cache or learned examples),
run one after the other in the same session: the cascade as calibrated (learning on, as a user gets it) and the
fallback alone (`--engine none`: the ceiling of what a job can do without the LLM); and each of them again on Ray
Data (`--ray local`, a Ray instance started on this machine by the job) with 1 and 2 workers per stage. Each is a
separate `labelcascade label` process; rows/s is its wall time (model loading and, on Ray, starting Ray included),
peak memory its maximum resident set size (from wait4) and, on Ray, the largest of each worker kind's
(`ray::...FallbackStage` / `LLMStage` processes, sampled from /proc every 0.2 s), the LLM share the routes in its
output. Results: bench/results/job.json and a section of BENCHMARKS.md (`--out`, `--heading` for another; the Ray
arms at 1,000 rows: `--rows 1000 --out bench/results/job_ray.json --heading "## Labelling job on Ray Data
(bench/job.py --rows 1000)"`; `--markdown-only` writes the section again from the JSON).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from labelcascade import Session, Task

from common import DEFAULT_DATA, HF_CHECKPOINT, MARKDOWN, REPO, log, per_class_draw, read_jsonl, write_markdown_section

DEFAULT_OUT = REPO / "bench" / "results" / "job.json"
HEADING = "## Labelling job (bench/job.py)"
DATASET, SHOTS, SEED, DEV_SEED, DEV_SIZE = "ag_news", 8, 0, 7, 200
TARGET_PRECISION, LLM_BUDGET = 0.95, 0.4
LABELCASCADE = Path(sys.executable).with_name("labelcascade")


def prepare(data: Path, rows: int) -> tuple[list[dict], list[dict], list[dict]]:
    """(pool, dev, job rows): pool and dev from the ag_news training split, the job's rows from the rest of it
    and, past its 10,001 texts, from the test split (a job reads texts, not labels)."""
    train = read_jsonl(data / DATASET / "train.jsonl")
    picked = per_class_draw(train, SEED, DATASET)
    pool = [train[i] for label in sorted(picked) for i in picked[label][:SHOTS]]
    used = {row["text"] for row in pool}
    rest = [row for row in train if row["text"] not in used]
    order = random.Random(DEV_SEED).sample(range(len(rest)), len(rest))
    dev = [rest[i] for i in order[:DEV_SIZE]]
    unlabelled = [rest[i] for i in order[DEV_SIZE:]] + read_jsonl(data / DATASET / "test.jsonl")
    if rows > len(unlabelled):
        raise SystemExit(f"--rows {rows}: {DATASET} has only {len(unlabelled)} texts outside pool and dev")
    return pool, dev, unlabelled[:rows]


def build_workspace(path: Path, pool: list[dict], dev: list[dict]) -> dict:
    """A calibrated workspace on the embedded default engine; returns the calibration's choices."""
    labels = json.loads((DEFAULT_DATA / DATASET / "labels.json").read_text(encoding="utf-8"))["labels"]
    session = Session.create(Task.from_labels(labels, name=DATASET), workspace=path)
    session.add_examples([row["text"] for row in pool], [row["label"] for row in pool], retrain=True)
    report = session.calibrate([row["text"] for row in dev], [row["label"] for row in dev],
                                  target_precision=TARGET_PRECISION, llm_budget=LLM_BUDGET)
    session.close()
    return report.policy.model_dump()


ARMS = {  # name: (engine, Ray workers per stage or None)
    "cascade": (None, None), "fallback only": ("none", None),
    "cascade, ray 1": (None, 1), "cascade, ray 2": (None, 2),
    "fallback only, ray 1": ("none", 1), "fallback only, ray 2": ("none", 2),
    # the same Gemma 3 270M through the transformers engine in bfloat16 (the checkpoint `tools/vllm_server.sh setup`
    # converts from the packaged GGUF), in one process; the workspace was calibrated on llama.cpp's scores
    "cascade, transformers bfloat16": (f"transformers:{HF_CHECKPOINT}#bfloat16", None),
}
WORKER_KINDS = ("FallbackStage", "LLMStage")


class WorkerMemory:
    """Peak resident memory of each kind of Ray worker (`ray::...FallbackStage...` processes), sampled from /proc
    while a job runs."""

    def __init__(self) -> None:
        self.peak_mb = {kind: 0.0 for kind in WORKER_KINDS}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> WorkerMemory:
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            for proc in Path("/proc").iterdir():
                try:
                    command = (proc / "cmdline").read_bytes().decode(errors="replace")
                    if not command.startswith("ray::"):
                        continue
                    kind = next((k for k in WORKER_KINDS if k in command), None)
                    rss = next(int(line.split()[1]) for line in (proc / "status").read_text().splitlines()
                               if line.startswith("VmRSS:"))
                except (OSError, StopIteration, ValueError):
                    continue
                if kind is not None:
                    self.peak_mb[kind] = max(self.peak_mb[kind], rss / 1024)


def llm_cpus(ray_workers: int) -> int:
    """CPUs (and llama.cpp threads) per LLM worker: the machine's cores shared out, as the single process uses them."""
    return max(1, (os.cpu_count() or 1) // ray_workers)


def run_job(workspace: Path, source: Path, destination: Path, engine: str | None, ray_workers: int | None) -> dict:
    """One `labelcascade label` process: wall time, peak memory and the routes of its output."""
    command = [str(LABELCASCADE), "label", str(workspace), str(source), str(destination), "--no-progress"]
    if engine is not None:
        command += ["--engine", engine]
    if ray_workers is not None:
        command += ["--ray", "local", "--embed-workers", str(ray_workers), "--llm-workers", str(ray_workers),
                    "--llm-cpus", str(llm_cpus(ray_workers))]
    began = time.perf_counter()
    with WorkerMemory() as workers:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - began
    stderr = process.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{stderr}")
    routes = Counter(json.loads(line)["route"] for line in destination.read_text(encoding="utf-8").splitlines())
    rows = sum(routes.values())
    return {"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds, "peak_rss_mb": usage.ru_maxrss / 1024,
            "worker_peak_rss_mb": workers.peak_mb if ray_workers is not None else None, "ray_workers": ray_workers,
            "routes": dict(routes), "llm_share": routes.get("llm", 0) / rows, "summary": stderr.strip().splitlines()[-1]}


def section(result: dict, heading: str = HEADING, out: Path = DEFAULT_OUT) -> str:
    arms = result["arms"]
    lines = [heading, "", f"Generated by `bench/job.py` on {result['date']}; raw numbers in `bench/results/{out.name}`. "
             f"{result['rows']} rows of {DATASET} texts (training texts outside pool and dev, then test texts); workspace: {SHOTS} gold/class, calibrated "
             f"on {DEV_SIZE} dev texts (target precision {TARGET_PRECISION}, LLM budget {LLM_BUDGET}; chosen accept "
             f"{result['policy']['accept_threshold']:.3f}, LLM weight {result['policy']['llm_weight']:.1f}); each arm a separate "
             f"`labelcascade label` process in its own copy of the workspace, run back to back; {result['machine']['cpu_count']} "
             f"shared CPU cores, load {result['machine']['load_start']} at start. Ray arms: `--ray local` with N "
             "fallback workers (one CPU each) and N LLM workers (`--llm-cpus` cores/N each: their llama.cpp "
             "threads); their peak memory is the driver's, then the largest worker "
             "of each stage's.", "",
             "| arm | rows | rows/s | sent to LLM | routes | peak memory MB (driver / fallback worker / LLM worker) "
             "| wall s |", "|---|---:|---:|---:|---|---:|---:|"]
    for name, arm in arms.items():
        routes = ", ".join(f"{route} {count}" for route, count in sorted(arm["routes"].items()))
        memory = f"{arm['peak_rss_mb']:.0f}"
        if arm.get("worker_peak_rss_mb"):
            memory += "".join(f" / {arm['worker_peak_rss_mb'][kind]:.0f}" if arm["worker_peak_rss_mb"][kind] else " / -"
                              for kind in WORKER_KINDS)
        lines.append(f"| {name} | {arm['rows']} | {arm['rows_per_s']:.1f} | {arm['llm_share']:.1%} | {routes} "
                     f"| {memory} | {arm['seconds']:.0f} |")
    lines.append("")
    if "cascade" in arms and "fallback only" in arms:
        cascade, ceiling = arms["cascade"], arms["fallback only"]
        lines += [f"Cascade / fallback-only throughput: {cascade['rows_per_s'] / ceiling['rows_per_s']:.3f} "
                  f"(the fallback-only job is {ceiling['rows_per_s'] / cascade['rows_per_s']:.1f}x faster).", ""]
    for name, arm in arms.items():
        single = arms.get(name.split(", ray")[0])
        if arm.get("ray_workers") and single is not None:
            lines.append(f"- {name}: {arm['rows_per_s'] / single['rows_per_s']:.2f}x the single-process job's rows/s.")
        elif "transformers" in name and "cascade" in arms:
            lines.append(f"- {name}: {arm['rows_per_s'] / arms['cascade']['rows_per_s']:.2f}x the llama.cpp cascade's "
                         f"rows/s, at {arm['peak_rss_mb'] / arms['cascade']['peak_rss_mb']:.2f}x its peak memory.")
    lines.append("")
    lines += scaling_model(arms)
    return "\n".join(lines)


def scaling_model(arms: dict) -> list[str]:
    """What this run's per-row costs say a job on W workers would do (written beside the measured arms)."""
    needed = ("cascade", "fallback only", "fallback only, ray 1")
    if not all(name in arms for name in needed):
        return []
    cascade, fallback, on_ray = (arms[name] for name in needed)
    llm_calls = cascade["routes"].get("llm", 0) + cascade["routes"].get("degraded", 0)
    per_row = fallback["seconds"] / fallback["rows"]  # the fallback's cost per row, loading included
    per_llm = (cascade["seconds"] - fallback["seconds"]) / max(llm_calls, 1)
    share = llm_calls / cascade["rows"]
    ray_start = on_ray["seconds"] - fallback["seconds"]
    return [
        "### Scaling model", "",
        f"From this run: the fallback costs c_fb = {1000 * per_row:.1f} ms per row (one process, 2 cores, model "
        f"loading included), the LLM c_llm = {per_llm:.2f} s per text it answers (llama.cpp, Gemma 3 270M, 2 threads), "
        f"the calibrated cascade sends s = {share:.1%} of the rows to it, and Ray adds about {ray_start:.0f} s per job "
        "(starting Ray, shipping the workspace, starting the actors; once per pass for the actors).",
        "",
        f"On this machine every worker shares the same {os.cpu_count()} cores, so the Ray arms show the overhead, not "
        "a speed-up: two llama.cpp workers split the cores (one thread each), and the fallback's rows/s "
        "already uses both cores in one process. A speed-up needs workers with cores (or GPUs) of their own.",
        "",
        "With W_fb fallback workers and W_llm LLM workers, each with its own cores, a pass runs at about "
        "rows/s = min(W_fb / c_fb, W_llm / (s x c_llm), R_driver): the two stages stream, so the slower one sets the "
        f"pace. On CPU the LLM is that one: with c_llm = {per_llm:.2f} s and s = {share:.0%}, each llama.cpp worker adds "
        f"about {1 / (share * per_llm):.1f} rows/s, and one fallback worker keeps up with about "
        f"{share * per_llm / per_row:.0f} of them. On a GPU worker (`--llm-gpus 1` with `--engine transformers:PATH`, "
        "which takes the GPU by default, or `vllm-offline:PATH`), c_llm is that GPU's seconds per scored text: "
        "bench/gpu_llm.py measured it for the transformers engine on one GPU (section \"One GPU LLM worker\" below); "
        "vLLM on a GPU was not measured.",
        "",
        "What stays serial, on the machine that runs the command: reading and checking the file before any work, "
        "committing each batch of answers to the job's state (SQLite, one transaction per batch), the answer cache, "
        "writing the output in input order at the end, and between passes the learning (the pass's confident LLM "
        "answers stored, the fallback retrained on one node) and shipping the workspace again. R_driver is the rate "
        "of that part; the fallback-only Ray arms above bound it from below.", "",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=[name for name in ARMS if "transformers" not in name])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--markdown", type=Path, default=MARKDOWN)
    parser.add_argument("--no-markdown", action="store_true")
    parser.add_argument("--heading", default=HEADING)
    parser.add_argument("--markdown-only", action="store_true", help="write the section again from --out; run nothing")
    args = parser.parse_args(argv)
    if args.markdown_only:
        text = section(json.loads(args.out.read_text(encoding="utf-8")), args.heading, args.out)
        print(text)
        write_markdown_section(args.markdown, args.heading, text)
        return 0
    result = {"date": dt.date.today().isoformat(), "rows": args.rows, "arms": {},
              "machine": {"cpu_count": os.cpu_count(), "load_start": [round(x, 1) for x in os.getloadavg()]}}
    pool, dev, rows = prepare(args.data, args.rows)
    with tempfile.TemporaryDirectory(prefix="labelcascade-job-") as folder:
        folder = Path(folder)
        source = folder / "rows.jsonl"
        source.write_text("".join(json.dumps({"id": i, "text": row["text"]}) + "\n" for i, row in enumerate(rows)))
        log(f"calibrating a workspace on {len(pool)} gold examples and {len(dev)} dev texts")
        result["policy"] = build_workspace(folder / "ws", pool, dev)
        for name in args.arms:
            engine, ray_workers = ARMS[name]
            workspace = folder / f"ws-{name.replace(' ', '-').replace(',', '')}"
            shutil.copytree(folder / "ws", workspace)
            log(f"{name}: labelling {args.rows} rows")
            result["arms"][name] = run_job(workspace, source, folder / f"{workspace.name}.jsonl", engine, ray_workers)
            log(f"  {result['arms'][name]['summary']}")
    result["machine"]["load_end"] = [round(x, 1) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    text = section(result, args.heading, args.out)
    print(text)
    if not args.no_markdown:
        write_markdown_section(args.markdown, args.heading, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
