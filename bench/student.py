#!/usr/bin/env python
"""The student with a tuned body against the frozen bodies, on the seven datasets, side by side in one run.

    .venv/bin/python bench/student.py                          # 7 datasets, 8/class, seed 0 (~20 min, 2 cores)
    .venv/bin/python bench/student.py --datasets trec --no-markdown   # smoke run

Per dataset, seed and shots (the draws of bench/common.py: the same gold sets as bench/fallback.py, bench/embedders.py
and bench/cascade.py) and a fixed sample of --test-size test texts (500: the sample of bench/cascade.py):
- "minilm", "e5": the fallback's `LinearSVMClassifier` (C=1) over frozen all-MiniLM-L6-v2 / multilingual-e5-small;
- "tuned": all-MiniLM-L6-v2 fine-tuned on the gold texts by `fallback.body_tuning.tune_body` (SetFit's pairs, the
  product's default time limit), then the same SVM over its vectors: what `embedder="tuned"` builds;
- "tfidf": TF-IDF + LinearSVC as in bench/embedders.py.
- "setfit" (with --setfit, needs the bench extra): SetFit on the same body and gold set (bench/setfit_anchor.py).
Accuracy, macro-F1 and ECE (15 bins, of the calibrated SVM's top probability); the tuning time. Without --setfit,
SetFit's accuracy from bench/results/cascade.json where it has it (the same gold set and test sample at seed 0,
8/class; an earlier run, so no time).
Results: bench/results/student.json and the "## Student: tuned body (bench/student.py)" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import tempfile
import time

import numpy as np
from sklearn.metrics import accuracy_score, f1_score

from labelcascade.fallback import LinearSVMClassifier
from labelcascade.fallback.body_tuning import DEFAULT_MAX_SECONDS, tune_body
from labelcascade.fallback.calibration import expected_calibration_error
from labelcascade.retrieval import SentenceTransformerEmbedder, load_embedder
from labelcascade.retrieval.embedders import default_model_dir

from common import MARKDOWN, REPO, log, machine_and_load, output_arguments, publish, rebuilt_section_only
from embedders import EMBEDDERS, Vectors, gold_set_arguments, gold_sets, splits, tfidf_cell

DEFAULT_OUT = REPO / "bench" / "results" / "student.json"
CASCADE_RESULTS = REPO / "bench" / "results" / "cascade.json"
SECTION_HEADING = "## Student: tuned body (bench/student.py)"
METHODS = ["minilm", "e5", "tfidf", "tuned"]
ECE_BINS = 15


def scored(model: LinearSVMClassifier, vectors: np.ndarray, truth: np.ndarray) -> dict:
    proba = model.predict_proba(vectors)
    predicted = model.classes_[proba.argmax(axis=1)]
    truth_index = np.searchsorted(model.classes_, truth)  # every test label is among the gold set's classes
    return {"accuracy": accuracy_score(truth, predicted), "macro_f1": f1_score(truth, predicted, average="macro"),
            "ece": float(expected_calibration_error(proba, truth_index, ECE_BINS))}


def run_dataset(name: str, args, vectors: dict[str, Vectors]) -> dict:
    train, texts, truth = splits(args, name)
    cells = []
    for seed, shots, xs, ys in gold_sets(args, name, train):
        cell = {"seed": seed, "shots": shots}
        for key, cache in vectors.items():
            cell[key] = scored(LinearSVMClassifier().fit(cache.get(xs), ys), cache.get(texts), truth)
        cell["tfidf"] = tfidf_cell(name, xs, ys, texts, truth)
        with tempfile.TemporaryDirectory(prefix="tuned-") as body:
            report = tune_body(default_model_dir(), xs, ys, body, max_seconds=args.tuning_seconds, seed=seed)
            tuned = SentenceTransformerEmbedder(body, name="tuned")
            began = time.perf_counter()
            model = LinearSVMClassifier().fit(tuned.embed(xs), ys)
            fit = report.seconds + time.perf_counter() - began
            cell["tuned"] = scored(model, tuned.embed(texts), truth)
        cell["tuned"].update(fit_s=fit, pairs=report.pairs_trained, pairs_planned=report.pairs_planned,
                             stopped_at_deadline=report.stopped_at_deadline)
        if args.setfit:
            from setfit_anchor import setfit_predict  # needs the bench extra: pip install -e '.[bench]'

            anchor = setfit_predict(xs, ys, texts, seed=seed)
            predicted = anchor["predictions"]
            cell["setfit"] = {"accuracy": accuracy_score(truth, predicted), "fit_s": anchor["train_seconds"],
                              "macro_f1": f1_score(truth, predicted, average="macro")}
        cells.append(cell)
        log(f"  {name:9} seed {seed} {shots:2}/class: " + ", ".join(
            f"{m} {100 * cell[m]['accuracy']:.1f}" for m in METHODS) + f" (tuned in {fit:.0f} s)")
    return {"name": name, "test_n": len(texts), "labels": len({r["label"] for r in train}), "cells": cells}


def setfit_reference() -> tuple[dict[str, float], str | None]:
    """SetFit's accuracy per dataset from bench/cascade.py's last run (seed 0, 8/class, its 500 test texts), and
    that run's date."""
    if not CASCADE_RESULTS.is_file():
        return {}, None
    result = json.loads(CASCADE_RESULTS.read_text(encoding="utf-8"))
    return ({d["dataset"]: d["arms"]["setfit"]["accuracy"] for d in result["datasets"] if "setfit" in d["arms"]},
            result["date"])


def markdown(result: dict) -> str:
    s = result["settings"]
    reference = result.get("setfit_reference", {})
    lines = [
        SECTION_HEADING, "",
        f"Measured {result['date']} in {result['run_seconds']:.0f} s on {s['machine']} (1-min load {s['load_start']} at the "
        f"start), seeds {s['seeds']}, {s['test_size']} test texts per dataset (fewer where the test split is smaller), "
        f"tuning limit {s['tuning_seconds']:.0f} s. Accuracy (macro-F1) [ECE] in %, mean over seeds. minilm / e5: the "
        "fallback's SVM over frozen all-MiniLM-L6-v2 / multilingual-e5-small; tuned: all-MiniLM-L6-v2 fine-tuned on "
        "the gold texts (`embedder=\"tuned\"`), then the same SVM; tfidf: TF-IDF + LinearSVC. setfit: SetFit on the "
        "same body, gold set and test texts (bench/setfit_anchor.py, logistic-regression head, one torch thread) "
        "and its training time, in this run; or, marked \"earlier run\", its accuracy from bench/cascade.py's run of "
        f"{result.get('setfit_date', '?')} (seed 0, 8/class).", "",
        "| dataset | shots | minilm | e5 | tfidf | tuned | tuned - best frozen | setfit | tune s (pairs) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for dataset in result["datasets"]:
        for shots in s["shots"]:
            cells = [c for c in dataset["cells"] if c["shots"] == shots]

            def mean(method: str, key: str) -> float:
                return 100 * float(np.mean([c[method][key] for c in cells]))

            def cell(method: str) -> str:
                ece = f" [{mean(method, 'ece'):.1f}]" if "ece" in cells[0][method] else ""
                return f"{mean(method, 'accuracy'):.1f} ({mean(method, 'macro_f1'):.1f}){ece}"

            best_frozen = max(mean(m, "accuracy") for m in ("minilm", "e5", "tfidf"))
            if "setfit" in cells[0]:
                setfit_text = f"{cell('setfit')} in {np.median([c['setfit']['fit_s'] for c in cells]):.0f} s"
            else:
                setfit = reference.get(dataset["name"]) if shots == 8 and s["seeds"] == [0] else None
                setfit_text = f"{100 * setfit:.1f} (earlier run)" if setfit is not None else "-"
            tune_s = float(np.median([c["tuned"]["fit_s"] for c in cells]))
            pairs = int(np.median([c["tuned"]["pairs"] for c in cells]))
            lines.append(f"| {dataset['name']} | {shots} | {cell('minilm')} | {cell('e5')} | {cell('tfidf')} | "
                         f"{cell('tuned')} | {mean('tuned', 'accuracy') - best_frozen:+.1f} | {setfit_text} | "
                         f"{tune_s:.0f} ({pairs}) |")
    lines += ["", "Rerun: `.venv/bin/python bench/student.py`.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    gold_set_arguments(parser, seeds=[0], shots=[8], test_size=500)
    parser.add_argument("--tuning-seconds", type=float, default=DEFAULT_MAX_SECONDS)
    parser.add_argument("--setfit", action="store_true", help="SetFit in the same run (needs the bench extra)")
    output_arguments(parser, DEFAULT_OUT)
    args = parser.parse_args(argv)
    if rebuilt_section_only(args, SECTION_HEADING, markdown):
        return 0
    began = time.monotonic()
    settings = {"datasets": args.datasets, "seeds": args.seeds, "shots": args.shots, "test_size": args.test_size,
                "tuning_seconds": args.tuning_seconds, "setfit": args.setfit, **machine_and_load()}
    log(f"student benchmark: {settings}")
    vectors = {key: Vectors(load_embedder(spec)) for key, spec in EMBEDDERS.items()}
    datasets = [run_dataset(name, args, vectors) for name in args.datasets]
    reference, reference_date = setfit_reference()
    result = {"date": dt.date.today().isoformat(), "run_seconds": time.monotonic() - began, "settings": settings,
              "datasets": datasets, "setfit_reference": reference, "setfit_date": reference_date}
    publish(result, args.out, markdown(result), markdown=None if args.no_markdown else MARKDOWN, heading=SECTION_HEADING)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
