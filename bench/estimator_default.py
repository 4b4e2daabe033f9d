#!/usr/bin/env python
"""What a scikit-learn user gets from `Classifier()`'s default engine, calibrated on its training texts or not,
beside `engine=None`.

    .venv/bin/python bench/estimator_default.py          # five datasets, 150 texts, 3 seeds (~19 min on 2 cores)
    .venv/bin/python bench/estimator_default.py --datasets sms_spam --texts 60 --seeds 0 --no-markdown

Why: an estimator has no dev set. Uncalibrated (`llm_calibration=None`), it asks the LLM about every text the
fallback is less sure of than the default policy's accept threshold and mixes the answers at the default weight,
which helped on some tasks and hurt on others. By default `fit` calibrates on its own training texts, each measured
as one not seen (`Session.calibrate_on_examples`), at one LLM call per training text; this measures what that buys.

Per dataset and seed: the three estimators fitted on the same gold set (bench/common.py's draw, --shots per class),
with `embedder="default"` so that they differ by the LLM and its calibration alone; then `classify` of the first
--texts of the shuffled test sample (500), one estimator after the other. Accuracy, the share the LLM answered, the
wall time of `fit` and of `classify`. Results: bench/results/estimator_default.json and the section "## The
estimator's default engine (bench/estimator_default.py)" of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import time

import numpy as np

from labelcascade import Classifier
from labelcascade.agent import Policy
from labelcascade.agent.engines import DEFAULT_ENGINE

from common import (
    MARKDOWN, REPO, log, machine_and_load, output_arguments, per_class_draw, publish, read_jsonl, rebuilt_section_only,
    shuffled_test_sample,
)

HEADING = "## The estimator's default engine (bench/estimator_default.py)"
ARMS = {  # name: the estimator's parameters besides embedder="default"
    "engine=None": {"engine": None},
    "uncalibrated": {"engine": DEFAULT_ENGINE, "llm_calibration": None},
    "calibrated": {"engine": DEFAULT_ENGINE, "llm_calibration": "cv"},  # the default
}


def measure(args: argparse.Namespace, name: str, seed: int) -> dict:
    train = read_jsonl(args.data / name / "train.jsonl")
    picked = per_class_draw(train, seed, name)
    gold = [train[i] for label in sorted(picked) for i in picked[label][: args.shots]]
    test = shuffled_test_sample(read_jsonl(args.data / name / "test.jsonl"), 500)[: args.texts]
    texts, labels = [row["text"] for row in test], [row["label"] for row in test]
    arms = {}
    for arm, parameters in ARMS.items():
        estimator = Classifier(embedder="default", **parameters)
        start = time.perf_counter()
        estimator.fit([row["text"] for row in gold], [row["label"] for row in gold])
        fitted = time.perf_counter()
        answers = estimator.classify(texts)
        seconds = time.perf_counter() - fitted
        policy = estimator.session_.policy
        arms[arm] = {
            "accuracy": sum(a.label == label for a, label in zip(answers, labels, strict=True)) / len(texts),
            "llm_share": sum(a.route.value == "llm" for a in answers) / len(texts),
            "seconds": seconds,
            "fit_seconds": fitted - start,
            "accept_threshold": policy.accept_threshold,
            "llm_weight": policy.llm_weight if policy.asks_llm else 0.0,
        }
        log(f"{name} seed {seed} {arm}: {arms[arm]}")
    return {"texts": len(texts), "arms": arms}


def markdown(result: dict) -> str:
    s = result["settings"]
    rows = []
    for name, by_seed in result["datasets"].items():
        cells = list(by_seed.values())

        def mean(arm: str, key: str) -> float:
            return float(np.mean([cell["arms"][arm][key] for cell in cells]))

        def median(arm: str, key: str) -> float:
            return float(np.median([cell["arms"][arm][key] for cell in cells]))

        gaps = [cell["arms"]["calibrated"]["accuracy"] - max(cell["arms"]["engine=None"]["accuracy"],
                                                            cell["arms"]["uncalibrated"]["accuracy"]) for cell in cells]
        settings = ", ".join(f"{cell['arms']['calibrated']['accept_threshold']:.2f}/"
                             f"{cell['arms']['calibrated']['llm_weight']:.1f}" for cell in cells)
        rows.append(
            f"| {name} | {cells[0]['texts']} | {100 * mean('engine=None', 'accuracy'):.1f} | "
            f"{100 * mean('uncalibrated', 'accuracy'):.1f} | {100 * mean('calibrated', 'accuracy'):.1f} | "
            f"{100 * np.mean(gaps):+.1f} ({', '.join(f'{100 * gap:+.1f}' for gap in gaps)}) | "
            f"{100 * mean('uncalibrated', 'llm_share'):.0f}% / {100 * mean('calibrated', 'llm_share'):.0f}% | "
            f"{settings} | {median('engine=None', 'fit_seconds'):.0f} / {median('uncalibrated', 'fit_seconds'):.0f} / "
            f"{median('calibrated', 'fit_seconds'):.0f} | {median('engine=None', 'seconds'):.1f} / "
            f"{median('uncalibrated', 'seconds'):.1f} / {median('calibrated', 'seconds'):.1f} |")
    return (
        f"{HEADING}\n\nGenerated by `.venv/bin/python bench/estimator_default.py` on {result['date']} (run time "
        f"{result['run_seconds']:.0f} s); raw numbers in `bench/results/estimator_default.json`. Do not edit by hand: "
        "the script rewrites this section.\n\n"
        f"Settings: three `Classifier(embedder=\"default\", ...)`: `engine=None`; engine {DEFAULT_ENGINE} with "
        f"`llm_calibration=None` (the default policy: accept threshold {s['accept_threshold']}, LLM weight "
        f"{s['llm_weight']}); and the default, engine {DEFAULT_ENGINE} calibrated by `fit` on its training texts "
        f"(`llm_calibration=\"cv\"`). All three fitted on bench/common.py's {s['shots']}/class gold set of each seed "
        f"({', '.join(map(str, s['seeds']))}); the first {s['texts']} texts of the shuffled test sample (500); "
        f"{s['machine']}, 1-min load {s['load_start']} at the start. Accuracy and LLM share: means over the seeds; "
        "\"vs best\": the calibrated estimator's accuracy minus the better of the other two, mean (per seed); "
        "calibrated accept/weight: what `fit` chose, per seed. Seconds: wall time of `fit` and of `classify` on the "
        "texts, median over the seeds.\n\n"
        "| dataset | texts | engine=None acc % | uncalibrated acc % | calibrated acc % | vs best | sent to the LLM "
        "(uncalibrated / calibrated) | calibrated accept/weight | fit s (None / uncal. / cal.) | classify s (None / "
        "uncal. / cal.) |\n|---|---:|---:|---:|---:|---|---:|---|---|---|\n" + "\n".join(rows) + "\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="trec,sst2,ag_news,sms_spam,eprstmt")
    parser.add_argument("--texts", type=int, default=150)
    parser.add_argument("--shots", type=int, default=8)
    parser.add_argument("--seeds", default="0,1,2", help="gold-set draws (bench/common.py's), comma-separated")
    output_arguments(parser, REPO / "bench" / "results" / "estimator_default.json")
    args = parser.parse_args()
    if rebuilt_section_only(args, HEADING, markdown):
        return
    started, policy = time.monotonic(), Policy()
    seeds = [int(seed) for seed in args.seeds.split(",")]
    settings = {**machine_and_load(), "texts": args.texts, "shots": args.shots, "seeds": seeds,
                "accept_threshold": policy.accept_threshold, "llm_weight": policy.llm_weight}
    datasets = {name: {str(seed): measure(args, name, seed) for seed in seeds} for name in args.datasets.split(",")}
    result = {"date": dt.date.today().isoformat(), "run_seconds": time.monotonic() - started, "settings": settings,
              "datasets": datasets}
    publish(result, args.out, markdown(result), markdown=None if args.no_markdown else MARKDOWN, heading=HEADING)


if __name__ == "__main__":
    main()
