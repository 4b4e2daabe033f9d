"""Benchmark the example store: exact (flat) against approximate (ivf) search as the store grows.

Run on purpose, not as a test:  .venv/bin/python bench/store.py  [--data random --sizes 10000,500000]

For each data set and size it fills an on-disk store with unit vectors of dim 384 (the size of all-MiniLM-L6-v2),
then measures, through the public ExampleStore API:
  * build time: adding every example to a flat store (SQLite rows + FAISS), and rebuilding the same store as ivf
    (read vectors back from SQLite, train k-means, add, calibrate nprobe);
  * median latency of single-query search (k=8; the store searches a single query on one thread);
  * recall@8 of ivf against the exact flat answers for the same queries.
Data sets:
  * random: uniform on the sphere, no cluster structure, the hardest case for IVF (a floor for its speed);
  * clustered: one centre per 100 examples, each vector at cosine ~0.7 from its centre, queries drawn the same way;
  * minilm: real all-MiniLM-L6-v2 embeddings of the banking77 and sst2 training texts in ../shared/data (stored)
    and of their test texts (queries); at most MINILM_MAX_SIZE of them, as embedding runs at ~500 texts/s here.
Flat search does the same work on any data, so its latency, and the threshold, do not depend on the data.
The results go to bench/results/store.json and the table to stdout; APPROX_INDEX_MIN_SIZE in
src/labelcascade/retrieval/store.py is the smallest size whose flat median latency exceeds 2 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from functools import cache
from pathlib import Path

import faiss
import numpy as np

from labelcascade.retrieval import load_embedder
from labelcascade.retrieval.store import ExampleStore

LATENCY_BUDGET_MS = 2.0  # flat search slower than this per query is worth an approximate index
ADD_BATCH = 50_000
DIM = 384
CLUSTER_SIZE = 100
CLUSTER_SPREAD = 0.05  # per-dimension noise around a centre: cosine to it ~ 1 / sqrt(1 + 384 * 0.05**2) = 0.7
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MINILM_DATASETS = ("banking77", "sst2")
MINILM_MAX_SIZE = 50_000


def unit_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    vectors = rng.standard_normal((n, DIM), dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@cache
def minilm_vectors(query_count: int) -> tuple[np.ndarray, np.ndarray]:
    """(stored, queries): embeddings of shuffled training texts and of test texts, embedded once per run."""
    def texts(split: str) -> list[str]:
        rows = []
        for dataset in MINILM_DATASETS:
            with (SHARED_DATA / dataset / f"{split}.jsonl").open(encoding="utf-8") as file:
                rows += [json.loads(line)["text"] for line in file]
        rng = np.random.default_rng(1)
        return [rows[i] for i in rng.permutation(len(rows))]

    embedder = load_embedder("default")
    return embedder.embed(texts("train")[:MINILM_MAX_SIZE]), embedder.embed(texts("test")[:query_count])


class Data:
    """The vectors of one data set at one size: `queries` to ask and `stored` to fill the store with."""

    def __init__(self, kind: str, size: int, query_count: int, rng: np.random.Generator):
        self.kind = kind
        if kind == "minilm":
            stored, self.queries = minilm_vectors(query_count)
            self.stored = stored[:size]
        elif kind == "random":
            self.queries, self.stored = unit_rows(rng, query_count), unit_rows(rng, size)
        elif kind == "clustered":
            centres = unit_rows(rng, max(1, size // CLUSTER_SIZE))

            def near_centres(n: int) -> np.ndarray:
                vectors = centres[rng.integers(len(centres), size=n)] + CLUSTER_SPREAD * rng.standard_normal(
                    (n, DIM), dtype=np.float32
                )
                return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

            self.queries, self.stored = near_centres(query_count), near_centres(size)
        else:
            raise ValueError(f"unknown data set {kind!r}; use random, clustered or minilm")


def single_query_latencies_ms(store: ExampleStore, queries: np.ndarray, k: int) -> tuple[list[float], list[list[int]]]:
    latencies, answers = [], []
    for query in queries:
        started = time.perf_counter()
        [row] = store.search(query[None, :], k)
        latencies.append((time.perf_counter() - started) * 1e3)
        answers.append([n.example.id for n in row])
    return latencies, answers


def bench_size(data: Data, k: int, folder: Path) -> dict:
    size = len(data.stored)
    store = ExampleStore(folder, embedder_id=data.kind, dim=DIM, index="flat")
    started = time.perf_counter()
    for start in range(0, size, ADD_BATCH):
        batch = data.stored[start : start + ADD_BATCH]
        store.add([f"text {start + row}" for row in range(len(batch))], [f"l{row % 50}" for row in range(len(batch))],
                  batch)
    flat_build_s = time.perf_counter() - started
    store.save()
    flat_ms, exact = single_query_latencies_ms(store, data.queries, k)
    store.close()

    started = time.perf_counter()
    store = ExampleStore(folder, embedder_id=data.kind, dim=DIM, index="ivf")  # rebuilds the index as IVF
    ivf_build_s = time.perf_counter() - started
    index = store._index.faiss  # the bench reports the structure the store chose; callers never need it
    ivf_ms, approximate = single_query_latencies_ms(store, data.queries, k)
    store.close()

    recall = sum(len(set(a) & set(e)) for a, e in zip(approximate, exact)) / sum(len(e) for e in exact)
    return {
        "data": data.kind,
        "size": size,
        "flat_build_s": round(flat_build_s, 2),
        "flat_median_ms": round(statistics.median(flat_ms), 3),
        "flat_p90_ms": round(float(np.percentile(flat_ms, 90)), 3),
        "ivf_build_s": round(ivf_build_s, 2),
        "ivf_nlist": int(index.nlist),
        "ivf_nprobe": int(index.nprobe),
        "ivf_median_ms": round(statistics.median(ivf_ms), 3),
        "ivf_p90_ms": round(float(np.percentile(ivf_ms, 90)), 3),
        "ivf_recall_at_k": round(recall, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="random,clustered,minilm")
    # 500,000 is left out by default: random and clustered at that size alone took 3 of a 5.4-minute run.
    parser.add_argument("--sizes", default="10000,25000,50000,100000,200000")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "store.json")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]

    settings = {
        "data": args.data,
        "cluster_size": CLUSTER_SIZE,
        "cluster_spread": CLUSTER_SPREAD,
        "minilm_texts": f"train (stored) and test (queries) texts of {' + '.join(MINILM_DATASETS)}, shuffled",
        "dim": DIM,
        "k": args.k,
        "queries": args.queries,
        "query_threads": 1,
        "latency": "wall time of ExampleStore.search for one query, SQLite lookup of the hits included",
        "cpu_cores": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "faiss": faiss.__version__,
        "numpy": np.__version__,
    }
    print(" ".join(f"{key}={value}" for key, value in settings.items() if key not in ("latency", "minilm_texts")))
    print(f"latency: {settings['latency']}\n")
    header = ("data", "size", "flat build s", "flat med ms", "flat p90 ms", "ivf build s", "nlist", "nprobe",
              "ivf med ms", "ivf p90 ms", f"ivf recall@{args.k}")
    print(("{:>9} " * len(header)).format(*header))

    rng = np.random.default_rng(0)
    rows = []
    started = time.perf_counter()
    for kind in args.data.split(","):
        for size in sizes:
            if kind == "minilm" and size > MINILM_MAX_SIZE:
                continue
            with tempfile.TemporaryDirectory(prefix="store-bench-") as folder:
                row = bench_size(Data(kind, size, args.queries, rng), args.k, Path(folder))
            rows.append(row)
            print(("{:>9} " * len(header)).format(*row.values()), flush=True)

    over_budget = [row["size"] for row in rows if row["flat_median_ms"] > LATENCY_BUDGET_MS]
    threshold = min(over_budget) if over_budget else None
    rule = f"smallest measured size whose flat single-query median latency exceeds {LATENCY_BUDGET_MS} ms"
    total_s = round(time.perf_counter() - started, 1)
    print(f"\nAPPROX_INDEX_MIN_SIZE ({rule}): {threshold}\ntotal {total_s} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"settings": settings, "results": rows, "approx_index_min_size": threshold, "rule": rule,
              "total_s": total_s}
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
