#!/usr/bin/env python
"""Benchmark of the fallback session (linear SVM over all-MiniLM-L6-v2 embeddings) against plain k-NN.

Run on purpose, not part of the test suite:

    .venv/bin/python bench/fallback.py                      # everything, about 3-6 minutes on 2 CPU cores
    .venv/bin/python bench/fallback.py --datasets trec sst2 --seeds 0 --no-session

What it measures (details in BENCHMARKS.md, section "Fallback session"):

1. Accuracy, macro-F1, ECE (15 bins) and fit time of `LinearSVMClassifier` (C=1.0) trained on 8 and 16 gold
   examples per class, for each dataset and seed, and the same (minus fit time's relevance) for
   `KNeighborsClassifier(n_neighbors=8, metric="cosine")` on the very same vectors. Each text is embedded once
   per run; the vectors are cached in memory by text and shared by SVM and k-NN.
   Training draw for seed s: `random.Random(1000 + s)`, labels in sorted order, `rng.sample(pool, 16)` per label;
   the 8-shot set is the first 8 of the 16-shot draw, so the sets nest. Test: all of sst2 (872) and trec (500),
   a fixed sample of 1,000 for the others (`random.Random(20240607)`).
2. Throughput: texts/s of the embedder's own `embed` (batch 32; the packaged body on onnxruntime) vs
   `Session.classify(list_of_1000)` on the same 1,000 ag_news test texts, alternating, 3 repetitions each.
3. Latency: `Session.classify(one short text)` p50/p90 over 200 calls after 20 warm-up calls (banking77,
   16/class session, test texts of at most 40 characters).

Results go to bench/results/fallback.json and the "## Fallback session (bench/fallback.py)" section of
BENCHMARKS.md (regenerated on every run; other sections are left alone).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from labelcascade import Session, Task
from labelcascade.fallback import LinearSVMClassifier
from labelcascade.fallback.calibration import expected_calibration_error
from labelcascade.retrieval import load_embedder

from common import (
    DATASETS, DEFAULT_DATA, DRAW_PER_CLASS, MARKDOWN, REPO, TEST_SEED, TRAIN_SEED_BASE, log, per_class_draw, read_jsonl,
    test_sample, write_markdown_section,
)

DEFAULT_OUT = REPO / "bench" / "results" / "fallback.json"
SECTION_HEADING = "## Fallback session (bench/fallback.py)"

SVM_C = 1.0
KNN_K = 8
ECE_BINS = 15
EMBED_BATCH = 32
THROUGHPUT_DATASET, THROUGHPUT_SHOTS, THROUGHPUT_REPS = "ag_news", 8, 3
THROUGHPUT_N = 1000  # --throughput-texts
LATENCY_DATASET, LATENCY_SHOTS, LATENCY_WARMUP, SHORT_CHARS = "banking77", 16, 20, 40
LATENCY_CALLS = 200  # --latency-calls

# Bars the fallback must clear.
ECE_BAR, ECE_BAR_SHOTS, ECE_BAR_DATASETS = 0.10, 16, ("ag_news", "banking77", "trec")
KNN_BAR_SHOTS, KNN_BAR_MIN_WINS = 8, 4
LATENCY_BAR_P50_MS = 15.0
THROUGHPUT_BAR_RATIO = 0.8


# --- data ----------------------------------------------------------------------------------------------------


def load_dataset(data: Path, name: str, test_size: int, draw: int, seeds: list[int]) -> dict:
    folder = data / name
    train = read_jsonl(folder / "train.jsonl")
    test = read_jsonl(folder / "test.jsonl")
    labels = json.loads((folder / "labels.json").read_text(encoding="utf-8"))["labels"]
    test = test_sample(test, test_size)
    draws = {seed: per_class_draw(train, seed, name, draw) for seed in seeds}
    return {
        "name": name,
        "labels": labels,
        "train": train,
        "test_texts": [row["text"] for row in test],
        "test_labels": np.array([row["label"] for row in test], dtype=object).astype(str),
        "draws": draws,
    }


def training_set(ds: dict, seed: int, shots: int) -> tuple[list[str], list[str]]:
    texts, labels = [], []
    for label, indices in ds["draws"][seed].items():
        for i in indices[:shots]:
            texts.append(ds["train"][i]["text"])
            labels.append(ds["train"][i]["label"])
    return texts, labels


class VectorCache:
    """Each distinct text embedded once per run."""

    def __init__(self, embedder):
        self.embedder = embedder
        self.vectors: dict[str, np.ndarray] = {}
        self.seconds = 0.0
        self.count = 0

    def fill(self, texts: list[str], what: str, chunk: int = 1024) -> None:
        todo = list(dict.fromkeys(t for t in texts if t not in self.vectors))
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            t0 = time.perf_counter()
            vectors = self.embedder.embed(part, batch_size=EMBED_BATCH)
            elapsed = time.perf_counter() - t0
            self.seconds += elapsed
            self.count += len(part)
            self.vectors.update(zip(part, vectors, strict=True))
            log(f"  embedded {what}: {min(start + chunk, len(todo))}/{len(todo)} ({len(part) / elapsed:.0f} texts/s)")

    def get(self, texts: list[str]) -> np.ndarray:
        return np.stack([self.vectors[t] for t in texts])


# --- accuracy part -------------------------------------------------------------------------------------------


def evaluate(ds: dict, cache: VectorCache, seed: int, shots: int) -> dict:
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.neighbors import KNeighborsClassifier

    texts, labels = training_set(ds, seed, shots)
    X, y = cache.get(texts), np.array(labels, dtype=object).astype(str)
    X_test, y_test = cache.get(ds["test_texts"]), ds["test_labels"]

    t0 = time.perf_counter()
    svm = LinearSVMClassifier(C=SVM_C).fit(X, y)
    svm_fit_s = time.perf_counter() - t0
    proba = svm.predict_proba(X_test)
    pred = svm.classes_[proba.argmax(axis=1)]
    y_index = _indices(svm.classes_, y_test)

    t0 = time.perf_counter()
    knn = KNeighborsClassifier(n_neighbors=KNN_K, metric="cosine").fit(X, y)
    knn_fit_s = time.perf_counter() - t0
    knn_proba = knn.predict_proba(X_test)
    knn_pred = knn.predict(X_test)
    knn_index = _indices(knn.classes_, y_test)

    return {
        "dataset": ds["name"],
        "shots": shots,
        "seed": seed,
        "n_train": len(texts),
        "n_test": len(y_test),
        "svm_acc": float(accuracy_score(y_test, pred)),
        "svm_macro_f1": float(f1_score(y_test, pred, average="macro")),
        "svm_ece": expected_calibration_error(proba, y_index, n_bins=ECE_BINS),
        "svm_mean_confidence": float(proba.max(axis=1).mean()),
        "svm_temperature": float(svm.temperature_),
        "svm_fit_s": svm_fit_s,
        "knn_acc": float(accuracy_score(y_test, knn_pred)),
        "knn_macro_f1": float(f1_score(y_test, knn_pred, average="macro")),
        "knn_ece": expected_calibration_error(knn_proba, knn_index, n_bins=ECE_BINS),
        "knn_fit_s": knn_fit_s,
    }


def _indices(classes: np.ndarray, y: np.ndarray) -> np.ndarray:
    classes = np.asarray(classes).astype(str)
    index = np.searchsorted(classes, y)
    if np.any(index >= len(classes)) or np.any(classes[np.minimum(index, len(classes) - 1)] != y):
        raise RuntimeError("a test label is missing from the training classes")
    return index


METRICS = ["svm_acc", "svm_macro_f1", "svm_ece", "svm_fit_s", "knn_acc", "knn_macro_f1", "knn_ece"]


def summarise(runs: list[dict]) -> dict:
    summary: dict[str, dict] = {}
    for (name, shots) in dict.fromkeys((r["dataset"], r["shots"]) for r in runs):
        rows = [r for r in runs if r["dataset"] == name and r["shots"] == shots]
        entry = {"n_seeds": len(rows), "n_train": rows[0]["n_train"], "n_test": rows[0]["n_test"]}
        for metric in METRICS:
            values = [r[metric] for r in rows]
            entry[metric] = {
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "min": min(values),
                "max": max(values),
                "median": statistics.median(values),
            }
        summary.setdefault(name, {})[str(shots)] = entry
    return summary


# --- Session part -----------------------------------------------------------------------------------------


def classifier_part(datasets: dict, cache: VectorCache, embedder, seeds: list[int], data: Path, test_size: int) -> dict:
    seed = seeds[0]
    results: dict = {"seed": seed}
    for name in (THROUGHPUT_DATASET, LATENCY_DATASET):
        if name not in datasets:  # the Session part always runs on these two, whatever --datasets says
            datasets[name] = load_dataset(data, name, test_size, max(DRAW_PER_CLASS, THROUGHPUT_SHOTS), seeds)

    def fitted(ds: dict, shots: int):
        texts, labels = training_set(ds, seed, shots)
        clf = Session.create(Task.from_labels(ds["labels"], name=ds["name"]), embedder=embedder, engine=None)
        t0 = time.perf_counter()
        clf.add_examples(texts, labels, retrain=True)
        log(f"  Session fitted on {ds['name']} {shots}/class ({len(texts)} texts) in {time.perf_counter() - t0:.1f} s")
        return clf

    # Throughput: raw encode vs classify, alternating, on the same 1,000 texts.
    ds = datasets[THROUGHPUT_DATASET]
    texts = ds["test_texts"][:THROUGHPUT_N]
    clf = fitted(ds, THROUGHPUT_SHOTS)
    embedder.embed(texts[:64], batch_size=EMBED_BATCH)  # warm-up, both paths
    clf.classify(texts[:64])
    raw, cls = [], []
    predictions = None
    for rep in range(THROUGHPUT_REPS):
        t0 = time.perf_counter()
        embedder.embed(texts, batch_size=EMBED_BATCH)
        raw.append(len(texts) / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        predictions = clf.classify(texts)
        cls.append(len(texts) / (time.perf_counter() - t0))
        log(f"  throughput rep {rep + 1}/{THROUGHPUT_REPS}: raw encode {raw[-1]:.0f} texts/s, classify {cls[-1]:.0f} texts/s")
    # Sanity check: classify's answers against the directly trained SVM's (same examples, same settings).
    tr_texts, tr_labels = training_set(ds, seed, THROUGHPUT_SHOTS)
    cache.fill(tr_texts + texts, f"{ds['name']} (check)")  # no-op when the accuracy part covered this dataset
    direct = LinearSVMClassifier(C=SVM_C).fit(cache.get(tr_texts), tr_labels).predict(cache.get(texts))
    answered = np.array([p.label for p in predictions], dtype=object).astype(str)
    results["throughput"] = {
        "dataset": THROUGHPUT_DATASET,
        "n_texts": len(texts),
        "classifier_shots": THROUGHPUT_SHOTS,
        "batch_size": EMBED_BATCH,
        "repetitions": THROUGHPUT_REPS,
        "raw_encode_texts_per_s": raw,
        "classify_texts_per_s": cls,
        "raw_encode_median": statistics.median(raw),
        "classify_median": statistics.median(cls),
        "ratio": statistics.median(cls) / statistics.median(raw),
        "classify_accuracy": float(np.mean(answered == ds["test_labels"][: len(texts)])),
        "agreement_with_direct_svm": float(np.mean(answered == direct.astype(str))),
        "text_weight": clf.cascade.fallback.text_weight_,  # the session's TF-IDF n-grams ('auto'; 0: none)
    }
    clf.close()

    # Latency: one short text per call.
    ds = datasets[LATENCY_DATASET]
    clf = fitted(ds, LATENCY_SHOTS)
    load_before = list(os.getloadavg())
    if load_before[0] > (os.cpu_count() or 1):
        log(f"  WARNING: 1-min load average {load_before[0]:.1f} exceeds the {os.cpu_count()} cores: other processes compete "
            "for the CPU (the average lags by about a minute); compare with the interleaved raw encode below")
    short = [t for t in ds["test_texts"] if len(t) <= SHORT_CHARS]
    random.Random(TEST_SEED).shuffle(short)
    needed = LATENCY_WARMUP + LATENCY_CALLS
    calls = (short * (needed // max(len(short), 1) + 1))[:needed]
    for text in calls[:LATENCY_WARMUP]:
        clf.classify(text)
        embedder.embed([text], batch_size=EMBED_BATCH)
    # Each timed classify call is followed by a raw encode of the same text, for reference (not part of the bar).
    times_ms, raw_ms = [], []
    for text in calls[LATENCY_WARMUP:]:
        t0 = time.perf_counter()
        clf.classify(text)
        times_ms.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        embedder.embed([text], batch_size=EMBED_BATCH)
        raw_ms.append((time.perf_counter() - t0) * 1000)
    text_weight = clf.cascade.fallback.text_weight_
    clf.close()
    results["latency"] = {
        "dataset": LATENCY_DATASET,
        "text_weight": text_weight,
        "classifier_shots": LATENCY_SHOTS,
        "text_max_chars": SHORT_CHARS,
        "distinct_texts": min(len(short), needed),
        "median_text_chars": statistics.median(len(t) for t in calls[LATENCY_WARMUP:]),
        "warmup_calls": LATENCY_WARMUP,
        "calls": LATENCY_CALLS,
        "p50_ms": float(np.percentile(times_ms, 50)),
        "p90_ms": float(np.percentile(times_ms, 90)),
        "p99_ms": float(np.percentile(times_ms, 99)),
        "min_ms": min(times_ms),
        "max_ms": max(times_ms),
        "times_ms": times_ms,
        "load_average_before": load_before,
        "load_average_after": list(os.getloadavg()),
        "raw_encode_p50_ms": float(np.percentile(raw_ms, 50)),
        "raw_encode_p90_ms": float(np.percentile(raw_ms, 90)),
        "raw_encode_times_ms": raw_ms,
    }
    lat = results["latency"]
    log(f"  latency: classify p50 {lat['p50_ms']:.1f} ms, p90 {lat['p90_ms']:.1f} ms; "
        f"raw encode of the same text p50 {lat['raw_encode_p50_ms']:.1f} ms, p90 {lat['raw_encode_p90_ms']:.1f} ms")
    return results


# --- bars ----------------------------------------------------------------------------------------------------


def evaluate_bars(summary: dict, session: dict | None) -> list[dict]:
    bars = []
    # 1. ECE at 16/class on ag_news, banking77, trec (mean over seeds; the worst seed is reported too).
    cells = {name: summary.get(name, {}).get(str(ECE_BAR_SHOTS)) for name in ECE_BAR_DATASETS}
    present = {name: c for name, c in cells.items() if c}
    measured = {name: {"mean": c["svm_ece"]["mean"], "worst_seed": c["svm_ece"]["max"]} for name, c in present.items()}
    bars.append({
        "name": "calibration",
        "bar": f"fallback ECE <= {ECE_BAR:.2f} at {ECE_BAR_SHOTS}/class on {', '.join(ECE_BAR_DATASETS)} (mean over seeds)",
        "measured": measured,
        "status": "n/a" if len(present) < len(cells)
        else ("PASS" if all(m["mean"] <= ECE_BAR for m in measured.values()) else "FAIL"),
    })
    # 2. SVM accuracy at 8/class >= k-NN's on at least 4 of 5 datasets (mean over seeds).
    wins = {}
    for name in DATASETS:
        cell = summary.get(name, {}).get(str(KNN_BAR_SHOTS))
        if cell:
            wins[name] = {"svm_acc": cell["svm_acc"]["mean"], "knn_acc": cell["knn_acc"]["mean"],
                          "svm_wins": cell["svm_acc"]["mean"] >= cell["knn_acc"]["mean"]}
    n_wins = sum(w["svm_wins"] for w in wins.values())
    bars.append({
        "name": "beats k-NN",
        "bar": f"fallback accuracy >= k-NN's at {KNN_BAR_SHOTS}/class on >= {KNN_BAR_MIN_WINS} of 5 datasets (mean over seeds)",
        "measured": {"wins": n_wins, "datasets": len(wins), "per_dataset": wins},
        "status": "n/a" if len(wins) < len(DATASETS) else ("PASS" if n_wins >= KNN_BAR_MIN_WINS else "FAIL"),
    })
    latency = session and session.get("latency")
    bars.append({
        "name": "latency",
        "bar": f"classify(one short text) p50 <= {LATENCY_BAR_P50_MS:.0f} ms ({LATENCY_DATASET}, {LATENCY_SHOTS}/class)",
        "measured": {"p50_ms": latency["p50_ms"], "p90_ms": latency["p90_ms"]} if latency else None,
        "status": "n/a" if not latency else ("PASS" if latency["p50_ms"] <= LATENCY_BAR_P50_MS else "FAIL"),
    })
    throughput = session and session.get("throughput")
    bars.append({
        "name": "throughput",
        "bar": f"classify(list of {THROUGHPUT_N}) >= {THROUGHPUT_BAR_RATIO} x raw encode texts/s ({THROUGHPUT_DATASET})",
        "measured": {"ratio": throughput["ratio"], "classify_texts_per_s": throughput["classify_median"],
                     "raw_encode_texts_per_s": throughput["raw_encode_median"]} if throughput else None,
        "status": "n/a" if not throughput else ("PASS" if throughput["ratio"] >= THROUGHPUT_BAR_RATIO else "FAIL"),
    })
    return bars


def describe_measured(bar: dict) -> str:
    m = bar["measured"]
    if not m:
        return "not measured"
    if bar["name"] == "calibration":
        return ", ".join(f"{k} {v['mean']:.3f} (worst seed {v['worst_seed']:.3f})" for k, v in m.items())
    if bar["name"] == "beats k-NN":
        parts = [f"{k} {100 * v['svm_acc']:.1f} vs {100 * v['knn_acc']:.1f}" for k, v in m["per_dataset"].items()]
        return f"{m['wins']}/{m['datasets']} wins: " + ", ".join(parts) + " (% acc, SVM vs k-NN)"
    if bar["name"] == "latency":
        return f"p50 {m['p50_ms']:.1f} ms, p90 {m['p90_ms']:.1f} ms"
    return f"ratio {m['ratio']:.2f} ({m['classify_texts_per_s']:.0f} vs {m['raw_encode_texts_per_s']:.0f} texts/s)"


# --- reporting -----------------------------------------------------------------------------------------------


def pct(stat: dict, spread: bool = True) -> str:
    text = f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"
    return text + (f" [{100 * stat['min']:.1f}–{100 * stat['max']:.1f}]" if spread else "")


def frac(stat: dict, spread: bool = True) -> str:
    text = f"{stat['mean']:.3f} ± {stat['std']:.3f}"
    return text + (f" [{stat['min']:.3f}–{stat['max']:.3f}]" if spread else "")


TABLE_COLUMNS = ["dataset", "shots", "n train", "n test", "SVM acc %", "SVM macro-F1 %", "SVM ECE",
                 "k-NN acc %", "k-NN macro-F1 %", "k-NN ECE", "SVM fit (median)"]


def table_rows(summary: dict) -> list[list[str]]:
    rows = []
    for name, by_shots in summary.items():
        for shots, c in by_shots.items():
            rows.append([name, f"{shots}/class", str(c["n_train"]), str(c["n_test"]), pct(c["svm_acc"]),
                         pct(c["svm_macro_f1"]), frac(c["svm_ece"]), pct(c["knn_acc"]), pct(c["knn_macro_f1"]),
                         frac(c["knn_ece"]), f"{1000 * c['svm_fit_s']['median']:.0f} ms"])
    return rows


def settings_lines(settings: dict) -> list[str]:
    m = settings["machine"]
    return [
        f"embedder: {settings['embedder']['id']} (dim {settings['embedder']['dim']}), batch {EMBED_BATCH}, "
        "normalised vectors, each text embedded once per run",
        f"fallback: LinearSVMClassifier(C={SVM_C}) (default cv=5 temperature calibration); "
        f"k-NN: KNeighborsClassifier(n_neighbors={KNN_K}, metric='cosine', weights='uniform') on the same vectors",
        f"seeds {settings['seeds']}: training draw per seed s with random.Random({TRAIN_SEED_BASE}+s), labels sorted, "
        f"{settings['draw_per_class']} per class drawn, {min(settings['shots'])}-shot = prefix (nested)",
        f"test: up to {settings['test_size']} texts per dataset (fixed sample, seed {TEST_SEED}; sst2 872 and trec 500 in full)",
        f"ECE: top-1, {ECE_BINS} equal-width bins (labelcascade.fallback.calibration.expected_calibration_error)",
        f"machine: {m['cpu_count']} CPU cores (shared; 1/5/15-min load average {_load(m['load_average_at_start'])} at start, "
        f"{_load(m.get('load_average_at_end'))} at end), torch threads {m['torch_threads']}, {m['platform']}, Python {m['python']}, "
        f"torch {m['versions'].get('torch')}, sentence-transformers {m['versions'].get('sentence-transformers')}, "
        f"scikit-learn {m['versions'].get('scikit-learn')}",
    ]


def _load(values) -> str:
    return "/".join(f"{v:.1f}" for v in values) if values else "?"


def print_report(result: dict) -> None:
    rows = table_rows(result["summary"])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(TABLE_COLUMNS)]
    log("")
    log("=" * 100)
    log("Fallback session benchmark — mean ± std [min–max] over seeds")
    for line in settings_lines(result["settings"]):
        log("  " + line)
    log("")
    log("  ".join(h.ljust(w) for h, w in zip(TABLE_COLUMNS, widths, strict=True)))
    log("  ".join("-" * w for w in widths))
    for r in rows:
        log("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))
    cls = result.get("session")
    log("")
    if cls:
        t, lat = cls["throughput"], cls["latency"]
        log(f"Throughput ({t['dataset']}, {t['n_texts']} test texts, batch {t['batch_size']}, {t['repetitions']} alternating reps, median):")
        log(f"  raw embedder.embed             {t['raw_encode_median']:7.1f} texts/s   reps {', '.join(f'{v:.0f}' for v in t['raw_encode_texts_per_s'])}")
        log(f"  Session.classify(list)       {t['classify_median']:7.1f} texts/s   reps {', '.join(f'{v:.0f}' for v in t['classify_texts_per_s'])}")
        log(f"  ratio classify / raw            {t['ratio']:7.2f}")
        log(f"  classify accuracy on these texts {100 * t['classify_accuracy']:.1f}%, "
            f"agreement with the directly trained SVM {100 * t['agreement_with_direct_svm']:.1f}%")
        log(f"Latency ({lat['dataset']} {lat['classifier_shots']}/class session, {lat['calls']} calls after "
            f"{lat['warmup_calls']} warm-up, texts <= {lat['text_max_chars']} chars, median {lat['median_text_chars']:.0f}):")
        log(f"  classify(text)      p50 {lat['p50_ms']:.1f} ms, p90 {lat['p90_ms']:.1f} ms, p99 {lat['p99_ms']:.1f} ms, max {lat['max_ms']:.1f} ms")
        log(f"  raw embed([text])   p50 {lat['raw_encode_p50_ms']:.1f} ms, p90 {lat['raw_encode_p90_ms']:.1f} ms (reference, interleaved)")
        log(f"  1-min load average {lat['load_average_before'][0]:.1f} before, {lat['load_average_after'][0]:.1f} after "
            f"({os.cpu_count()} cores)")
    else:
        log(f"Session part not run: {result.get('classifier_skipped', 'skipped')}")
    log("")
    log("Bars:")
    for bar in result["bars"]:
        log(f"  [{bar['status']:4}] {bar['bar']}: {describe_measured(bar)}")
    log(f"Run time {result['run_time_s']:.0f} s; results in {result['out']}")
    log("=" * 100)


def _ngrams(measured: dict) -> str:
    """The session's TF-IDF n-gram weight, which a new workspace chooses itself ('auto'), as the table says it."""
    weight = measured.get("text_weight")
    return "" if weight is None else f" (TF-IDF n-grams at weight {weight:g})" if weight else " (vectors only: n-gram weight 0)"


def markdown_section(result: dict) -> str:
    lines = [SECTION_HEADING, ""]
    lines.append(
        f"Generated by `.venv/bin/python bench/fallback.py` on {result['finished'][:10]} "
        f"(run time {result['run_time_s']:.0f} s); raw per-seed numbers in `bench/results/fallback.json`. "
        "Do not edit by hand: the script rewrites this section."
    )
    lines.append("")
    lines.append("Settings:")
    lines.append("")
    lines += [f"- {line}" for line in settings_lines(result["settings"])]
    lines.append("")
    lines.append("### Accuracy and calibration (mean ± std [min–max] over seeds)")
    lines.append("")
    lines.append("| " + " | ".join(TABLE_COLUMNS) + " |")
    lines.append("|" + "|".join("---" if i < 2 else "---:" for i in range(len(TABLE_COLUMNS))) + "|")
    for r in table_rows(result["summary"]):
        lines.append("| " + " | ".join(r) + " |")
    lines.append("")
    lines.append("Fit time is `LinearSVMClassifier.fit` on precomputed vectors (5-fold temperature calibration + final fit), "
                 "median over seeds; embedding time is not included.")
    lines.append("")
    cls = result.get("session")
    lines.append("### Throughput and latency")
    lines.append("")
    if cls:
        t, lat = cls["throughput"], cls["latency"]
        lines.append("| measurement | setting | result |")
        lines.append("|---|---|---:|")
        lines.append(f"| raw `embedder.embed` | {t['n_texts']} {t['dataset']} test texts, batch {t['batch_size']}, "
                     f"median of {t['repetitions']} | {t['raw_encode_median']:.0f} texts/s |")
        lines.append(f"| `Session.classify(list)` | same texts, {t['classifier_shots']}/class session{_ngrams(t)}, alternating with the above | "
                     f"{t['classify_median']:.0f} texts/s |")
        lines.append(f"| ratio classify / raw | | {t['ratio']:.2f} |")
        lines.append(f"| `classify(one text)` p50 | {lat['dataset']} {lat['classifier_shots']}/class{_ngrams(lat)}, texts <= {lat['text_max_chars']} chars, "
                     f"{lat['calls']} calls after {lat['warmup_calls']} warm-up | {lat['p50_ms']:.1f} ms |")
        lines.append(f"| `classify(one text)` p90 | same | {lat['p90_ms']:.1f} ms |")
        lines.append(f"| raw `embed([text])` p50 / p90 (reference) | same texts, interleaved with the calls above | "
                     f"{lat['raw_encode_p50_ms']:.1f} / {lat['raw_encode_p90_ms']:.1f} ms |")
        lines.append(f"| 1-min load average before / after the latency calls | {os.cpu_count()} cores | "
                     f"{lat['load_average_before'][0]:.1f} / {lat['load_average_after'][0]:.1f} |")
        lines.append("")
        lines.append(f"`classify` answers agreed with a directly trained `LinearSVMClassifier` (vectors only) on "
                     f"{100 * t['agreement_with_direct_svm']:.1f}% of the throughput texts.")
        lines.append("")
        runtime = result["settings"]["embedder"].get("runtime", "SentenceTransformerEmbedder")
        lines.append(f"The embedder ran as `{runtime}` (`OnnxBodyEmbedder`: the packaged body on onnxruntime; "
                     "`SentenceTransformerEmbedder`: in torch, as before 2026-12-04); it runs batches of up to 4 "
                     "texts on one thread (`SMALL_BATCH` in `retrieval/embedders.py`): with another process busy on "
                     "the second core a two-thread single-text encode in torch measured p50 496 ms against 9.7 ms on "
                     "one thread.")
    else:
        lines.append(f"Not measured in this run: {result.get('classifier_skipped', 'skipped')}.")
    lines.append("")
    lines.append("### Bars")
    lines.append("")
    lines.append("| bar | measured | result |")
    lines.append("|---|---|---|")
    for bar in result["bars"]:
        lines.append(f"| {bar['bar']} | {describe_measured(bar)} | **{bar['status']}** |")
    lines.append("")
    return "\n".join(lines)


# --- main ----------------------------------------------------------------------------------------------------


def machine_info() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("torch", "sentence-transformers", "scikit-learn", "numpy", "labelcascade"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    import torch

    return {
        "cpu_count": os.cpu_count(),
        "load_average_at_start": list(os.getloadavg()),
        "affinity_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "versions": versions,
    }


def main(argv: list[str] | None = None) -> int:
    global THROUGHPUT_N, LATENCY_CALLS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=DATASETS, choices=DATASETS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--shots", nargs="+", type=int, default=[8, 16], help="gold examples per class")
    parser.add_argument("--test-size", type=int, default=1000, help="test texts per dataset (sampled when larger)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--markdown", type=Path, default=MARKDOWN, help="file whose section to regenerate")
    parser.add_argument("--no-markdown", action="store_true")
    parser.add_argument("--no-session", action="store_true", help="skip the throughput/latency part")
    parser.add_argument("--throughput-texts", type=int, default=THROUGHPUT_N, help="ag_news texts per throughput rep")
    parser.add_argument("--latency-calls", type=int, default=LATENCY_CALLS, help="timed single-text calls")
    args = parser.parse_args(argv)

    THROUGHPUT_N, LATENCY_CALLS = args.throughput_texts, args.latency_calls
    began = time.perf_counter()
    started = dt.datetime.now(dt.timezone.utc)
    shots = sorted(set(args.shots))
    draw = max(DRAW_PER_CLASS, max(shots))

    log("loading embedder ...")
    embedder = load_embedder("default")
    cache = VectorCache(embedder)
    settings = {
        "embedder": {"id": embedder.id, "dim": embedder.dim, "batch_size": EMBED_BATCH,
                     "runtime": type(embedder).__name__},
        "svm": {"class": "labelcascade.fallback.svm.LinearSVMClassifier", "C": SVM_C, "cv": 5, "random_state": 0},
        "knn": {"class": "sklearn.neighbors.KNeighborsClassifier", "n_neighbors": KNN_K, "metric": "cosine",
                "weights": "uniform"},
        "datasets": args.datasets,
        "seeds": args.seeds,
        "shots": shots,
        "draw_per_class": draw,
        "train_seed_rule": f"random.Random({TRAIN_SEED_BASE} + seed), labels sorted, rng.sample(pool, {draw}) per label; "
                           "k shots = first k of the draw",
        "test_size": args.test_size,
        "test_seed": TEST_SEED,
        "ece_bins": ECE_BINS,
        "data": str(args.data),
        "machine": machine_info(),
    }

    datasets, runs = {}, []
    for name in args.datasets:
        log(f"[{name}] loading and embedding ...")
        ds = load_dataset(args.data, name, args.test_size, draw, args.seeds)
        datasets[name] = ds
        needed = list(ds["test_texts"])
        for seed in args.seeds:
            needed += training_set(ds, seed, max(shots))[0]
        cache.fill(needed, name)
        for shot in shots:
            for seed in args.seeds:
                r = evaluate(ds, cache, seed, shot)
                runs.append(r)
                log(f"  {name} {shot}/class seed {seed}: SVM acc {100 * r['svm_acc']:.1f} F1 {100 * r['svm_macro_f1']:.1f} "
                    f"ECE {r['svm_ece']:.3f} fit {1000 * r['svm_fit_s']:.0f} ms | k-NN acc {100 * r['knn_acc']:.1f} "
                    f"F1 {100 * r['knn_macro_f1']:.1f} ECE {r['knn_ece']:.3f}")
    summary = summarise(runs)

    session, skipped = None, None
    if args.no_session:
        skipped = "--no-session"
    else:
        log("Session part: throughput and latency ...")
        session = classifier_part(datasets, cache, embedder, args.seeds, args.data, args.test_size)

    result = {
        "benchmark": "fallback",
        "started": started.isoformat(timespec="seconds"),
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "settings": settings,
        "embedding": {"texts_embedded": cache.count, "seconds": cache.seconds,
                      "texts_per_s": cache.count / cache.seconds if cache.seconds else None},
        "runs": runs,
        "summary": summary,
        "session": session,
        "bars": evaluate_bars(summary, session),
        "out": str(args.out),
    }
    settings["machine"]["load_average_at_end"] = list(os.getloadavg())
    if skipped:
        result["classifier_skipped"] = skipped
    result["run_time_s"] = time.perf_counter() - began
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if not args.no_markdown:
        write_markdown_section(args.markdown, SECTION_HEADING, markdown_section(result))
    print_report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
