#!/usr/bin/env python
"""Would the fallback over a tuned body be better calibrated if its temperature were fitted on texts the body was
not tuned on? Measured side by side in one run, before building it (not built: see the section in BENCHMARKS.md).

    .venv/bin/python bench/tuned_calibration.py                     # ag_news, banking77, trec; 16/class; seed 0
    .venv/bin/python bench/tuned_calibration.py --datasets trec --shots 8 --no-markdown   # one cell

The product fits the SVM's temperature on the out-of-fold scores of the gold texts, which the tuned body was tuned
on; those may score as surely out of fold as in it, and make the answers overconfident (the tuned student's ECE is
up to 0.21 at 8/class). Per dataset, seed and shots (bench/common.py's gold sets, the same as bench/student.py's)
the body is the one `embedder="tuned"` tunes (`session.tuned_base`), and each arm scores the same --test-size test
texts:
- "frozen": the SVM over that body untuned (the fallback of embedder 'auto');
- "tuned on all": the body tuned on every gold text, the SVM and its temperature as the product fits them;
- "held out": the body tuned on all but --share of each label's gold texts (`calibration_split`), the SVM fitted on
  all of them, its temperature on the out-of-fold scores of the texts kept from tuning only (`held_out_temperature`,
  the product's folds and SVM);
- "tuned on all, held-out temperature": the first arm's SVM with the second's temperature (what tuning twice would
  give: the accuracy of the one, the calibration of the other, at twice the tuning time);
- "best temperature": the first arm's SVM with the temperature fitted (by likelihood) on the test texts themselves:
  about the best calibration one temperature can give (a bound, not a method).
Accuracy, macro-F1, ECE (15 bins, top label) and fit seconds (tuning + SVM).
Results: bench/results/tuned_calibration.json and the section "## Student: calibration of the tuned body
(bench/tuned_calibration.py)" of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import random
import tempfile
import time

import numpy as np
from sklearn.model_selection import StratifiedKFold

from labelcascade.fallback import LinearSVMClassifier
from labelcascade.fallback.body_tuning import DEFAULT_MAX_SECONDS, tune_body
from labelcascade.fallback.calibration import fit_temperature
from labelcascade.retrieval import SentenceTransformerEmbedder
from labelcascade.retrieval.embedders import default_model_dir
from labelcascade.session import tuned_base

from common import (
    MARKDOWN, REPO, log, machine_and_load, measured_on, output_arguments, publish, rebuilt_section_only,
)
from embedders import KEYS, Vectors, gold_set_arguments, gold_sets, splits
from student import run_datasets, score_text, scored, task_of

DEFAULT_OUT = REPO / "bench" / "results" / "tuned_calibration.json"
SECTION_HEADING = "## Student: calibration of the tuned body (bench/tuned_calibration.py)"
ARMS = ["frozen", "all", "held_out", "all_held_out_t", "best_t"]
SHARE = 0.25  # of each label's gold texts kept from tuning
MIN_TUNING_PER_LABEL = 3  # texts a label keeps for tuning (its positive pairs) before it gives any
FOLDS = 5  # the product's: LinearSVMClassifier(cv=5)


def calibration_split(labels: list[str], share: float, seed: int) -> tuple[list[int], list[int]]:
    """(tuning indices, held-out indices): `share` of each label's texts (rounded down) held out, as long as the
    label keeps MIN_TUNING_PER_LABEL; none at all unless texts of 2 labels can be held out."""
    rng = random.Random(seed)
    by_label: dict[str, list[int]] = {}
    for index, label in enumerate(labels):
        by_label.setdefault(label, []).append(index)
    held = [rng.sample(indices, count) for indices in by_label.values()
            if (count := min(int(len(indices) * share), len(indices) - MIN_TUNING_PER_LABEL)) > 0]
    if len(held) < 2:
        return list(range(len(labels))), []
    kept = {i for group in held for i in group}
    return [i for i in range(len(labels)) if i not in kept], sorted(kept)


def held_out_temperature(X: np.ndarray, y: np.ndarray, rows: list[int]) -> float:
    """The temperature fitted on the out-of-fold scores of `rows` alone, with the folds and SVM the product's
    `LinearSVMClassifier` uses for all rows."""
    classes, counts = np.unique(y, return_counts=True)
    folds = StratifiedKFold(min(FOLDS, int(counts.min())), shuffle=True, random_state=0)
    scores = np.empty((len(X), len(classes)))
    for train, test in folds.split(X, y):
        scores[test] = LinearSVMClassifier().fit(X[train], y[train]).decision_function(X[test])
    return fit_temperature(scores[rows], np.searchsorted(classes, y[rows]))


def tuned(base_dir, freeze: bool, args, seed: int, xs: list[str], ys: list[str], tuning: list[int],
          texts: list[str]) -> tuple[LinearSVMClassifier, np.ndarray, np.ndarray, float, int]:
    """The SVM over a body tuned on the gold texts at `tuning`, the gold and test vectors, fit seconds and pairs."""
    with tempfile.TemporaryDirectory(prefix="tuned-") as body:
        report = tune_body(base_dir, [xs[i] for i in tuning], [ys[i] for i in tuning], body,
                           max_seconds=args.tuning_seconds, seed=seed, freeze_token_embeddings=freeze)
        embedder = SentenceTransformerEmbedder(body, name="tuned")
        began = time.perf_counter()
        gold = embedder.embed(xs)
        model = LinearSVMClassifier().fit(gold, ys)
        fit_s = report.seconds + time.perf_counter() - began
        return model, gold, embedder.embed(texts), fit_s, report.pairs_trained


def with_temperature(model: LinearSVMClassifier, temperature: float) -> LinearSVMClassifier:
    changed = copy.copy(model)
    changed.temperature_ = temperature
    return changed


def run_dataset(name: str, args, vectors: dict[str, Vectors]) -> dict:
    train, texts, truth = splits(args, name)
    cells = []
    for seed, shots, xs, ys in gold_sets(args, name, train):
        base = tuned_base(task_of(name, ys), xs, [[y] for y in ys], load=lambda spec: vectors[KEYS[spec]])
        multilingual = KEYS[base] == "e5"
        base_dir = args.e5_body if multilingual else default_model_dir()
        frozen = vectors[KEYS[base]]
        cell = {"seed": seed, "shots": shots, "body": KEYS[base],
                "frozen": scored(LinearSVMClassifier().fit(frozen.get(xs), ys), frozen.get(texts), truth)}
        everything = list(range(len(xs)))
        model, _, test_vectors, fit_s, pairs = tuned(base_dir, multilingual, args, seed, xs, ys, everything, texts)
        cell["all"] = scored(model, test_vectors, truth) | {"fit_s": fit_s, "pairs": pairs,
                                                             "temperature": model.temperature_}
        tuning, held = calibration_split(ys, args.share, seed)
        held_model, gold, held_vectors, fit_s, pairs = tuned(base_dir, multilingual, args, seed, xs, ys, tuning, texts)
        if held:
            began = time.perf_counter()
            held_model = with_temperature(held_model, held_out_temperature(gold, np.array(ys), held))
            fit_s += time.perf_counter() - began
        cell["held_out"] = scored(held_model, held_vectors, truth) | {
            "fit_s": fit_s, "pairs": pairs, "temperature": held_model.temperature_, "held": len(held)}
        cell["all_held_out_t"] = scored(with_temperature(model, held_model.temperature_), test_vectors, truth)
        best = fit_temperature(model.decision_function(test_vectors), np.searchsorted(model.classes_, truth))
        cell["best_t"] = scored(with_temperature(model, best), test_vectors, truth) | {"temperature": best}
        cells.append(cell)
        log(f"  {name:9} seed {seed} {shots:2}/class ({cell['body']}): " + ", ".join(
            f"{arm} {100 * cell[arm]['accuracy']:.1f} [ECE {100 * cell[arm]['ece']:.1f}]" for arm in ARMS))
    return {"name": name, "test_n": len(texts), "cells": cells}


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        SECTION_HEADING, "",
        f"{measured_on(result)}, tuning limit {s['tuning_seconds']:.0f} s, share kept from tuning {s['share']}. Accuracy "
        "(macro-F1) [ECE] in %, mean over seeds. body: the one `embedder=\"tuned\"` tunes. frozen: the SVM over it "
        "untuned. tuned on all: tuned on every gold text, the SVM's temperature fitted on their out-of-fold scores "
        "(the product). held out: tuned on the rest, SVM on all, temperature on the out-of-fold scores of the texts "
        "kept from tuning. tuned on all, held-out temperature: the first SVM with the second's temperature (tuning "
        "twice). best temperature: the first SVM with the temperature fitted (by likelihood) on the test texts "
        "(about the best calibration one temperature can give; a bound, not a method). T: the temperatures fitted.", "",
        "| dataset | shots | body | frozen | tuned on all | held out | tuned on all, held-out temperature | "
        "best temperature | T: all / held out / best | fit s: all / held out |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for dataset in result["datasets"]:
        for shots in s["shots"]:
            cells = [c for c in dataset["cells"] if c["shots"] == shots]

            def mean(arm: str, key: str) -> float:
                return float(np.mean([c[arm][key] for c in cells]))

            bodies = "/".join(sorted({c["body"] for c in cells}))
            lines.append(
                f"| {dataset['name']} | {shots} | {bodies} | " + " | ".join(score_text(cells, arm) for arm in ARMS) + " | "
                f"{mean('all', 'temperature'):.3f} / {mean('held_out', 'temperature'):.3f} / "
                f"{mean('best_t', 'temperature'):.3f} | "
                f"{mean('all', 'fit_s'):.0f} / {mean('held_out', 'fit_s'):.0f} |")
    lines += ["", "Rerun: `.venv/bin/python bench/tuned_calibration.py`.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    gold_set_arguments(parser, seeds=[0], shots=[16], test_size=500)
    parser.set_defaults(datasets=["ag_news", "banking77", "trec"])
    parser.add_argument("--tuning-seconds", type=float, default=DEFAULT_MAX_SECONDS)
    parser.add_argument("--share", type=float, default=SHARE, help="of each label's texts kept from tuning")
    output_arguments(parser, DEFAULT_OUT)
    args = parser.parse_args(argv)
    if rebuilt_section_only(args, SECTION_HEADING, markdown):
        return 0
    began = time.monotonic()
    settings = {"datasets": args.datasets, "seeds": args.seeds, "shots": args.shots, "test_size": args.test_size,
                "tuning_seconds": args.tuning_seconds, "share": args.share, **machine_and_load()}
    log(f"tuned-body calibration benchmark: {settings}")
    datasets = run_datasets(args, run_dataset)
    result = {"date": dt.date.today().isoformat(), "run_seconds": time.monotonic() - began, "settings": settings,
              "datasets": datasets}
    publish(result, args.out, markdown(result), markdown=None if args.no_markdown else MARKDOWN, heading=SECTION_HEADING)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
