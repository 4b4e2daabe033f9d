#!/usr/bin/env python
"""Benchmark of the cascade against its parts and a peer, and of how it learns from a stream.

    .venv/bin/python bench/cascade.py                               # everything (hours on 2 CPU cores)
    .venv/bin/python bench/cascade.py --datasets sst2 --limit 20 --stream-size 100 --no-setfit   # smoke run
    .venv/bin/python bench/cascade.py --markdown-only               # rebuild the BENCHMARKS.md sections from the JSON
    .venv/bin/python bench/cascade.py --cascade-only --threads 1    # redo only the calibrated cascade arm of the JSON's run
    .venv/bin/python bench/cascade.py --stream-only --stream-dataset sst2 --threads 1   # redo only one stream
    .venv/bin/python bench/cascade.py --cascade-only --student tuned --datasets sst2 --out COPY.json   # the tuned student
    .venv/bin/python bench/cascade.py --stream-only --stream-dataset eprstmt --test-size 300 --out bench/results/stream.json \
        --stream-heading "Learning from a stream: ag_news, sst2, eprstmt (bench/cascade.py --stream-only)"   # streams alone
    .venv/bin/python bench/cascade.py --datasets eprstmt csldcp --stream-size 0 --no-setfit \
        --out bench/results/cascade_chinese.json --heading "Cascade: Chinese datasets (bench/cascade.py)"  # a part, apart

Per dataset (the five English ones and the Chinese eprstmt and csldcp; seed 0): a pool of 8 gold examples per class
(bench/fallback.py's 8/class set), a dev set of --dev-size training texts outside the pool (random.Random(7)), and
--test-size test texts (the fixed sample of bench/common.py). The task is labels.json (names + descriptions); the
embedder is the one `Session.create(embedder="auto")` picks from the pool (`chosen_embedder`), for every arm; the
engine is the embedded default (Gemma 3 270M Q4_K_M through llama.cpp) or the one --engine names (an engine spec of
`load_engine`: `llamacpp:qwen-1.5b` once `labelcascade install-model qwen-1.5b` has run). The test sample is shuffled
(seeded), so that the LLM arms' first n texts and a --limit are random subsets of it: banking77's and csldcp's test
files are grouped by label (runs before 2026-12-06 took them in file order, few labels; settings say `test_order`).
Arms, each on the same test texts:
- svm: the fallback alone (`Session.create(engine=None)`), k-NN: 8 nearest pool examples by cosine, majority vote;
- llm zero-shot / few-shot (k=8): the LLM alone over every label, through the cascade with accept threshold 1 and
  LLM weight 1 (capped at --llm-texts texts: it is the slow arm);
- cascade: the session calibrated on the dev set (`calibrate(target_precision=0.95, llm_budget=0.3,
  learn_precision=0.85, tolerance=0.01)`, which since 2026-12-06 also chooses the prompt layout, the policy's own or
  the cached one; `--cascade-only --layout` sets which it compares), learning switched off so every test text meets
  the same model;
- setfit: SetFit with the MiniLM body on the same pool (bench/setfit_anchor.py; `pip install -e '.[bench]'`), on
  the English datasets only (that body does not read Chinese; bench/student.py has the multilingual comparison).
Stream (one dataset, default ag_news): the calibrated session, learning on (retrain every --retrain-every LLM labels,
default the product's `Policy.retrain_every`), is fed --stream-size unlabelled texts in order, 20 at a time: training
texts outside pool and dev, or the dataset's unlabeled.jsonl where it has one (eprstmt); per 200-text window the share
sent to the LLM; test accuracy of the cascade and of its fallback before and after. With --stream-only and no earlier
result in --out, a result of streams alone (each calibrated on its own dev set), whose section carries their bars.
texts/s is wall time of `classify` (embedding included). Results: bench/results/cascade.json and two sections of
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, f1_score
from sklearn.neighbors import KNeighborsClassifier

from labelcascade import Session, Route
from labelcascade.agent import Policy
from labelcascade.agent.engines import DEFAULT_ENGINE, load_engine
from labelcascade.retrieval import load_embedder
from labelcascade.session import chosen_embedder
from labelcascade.task import Task

from common import (
    CHINESE, DATASETS, DEFAULT_DATA, MARKDOWN, REPO, TEST_SEED, llamacpp_model_title, log, per_class_draw, read_jsonl,
    shuffled_test_sample, test_sample, write_markdown_section,
)
from embedders import Vectors

DEFAULT_OUT = REPO / "bench" / "results" / "cascade.json"
ARMS_HEADING = "## Cascade (bench/cascade.py)"
STREAM_HEADING = "## Learning from a stream (bench/cascade.py)"
SHOTS, K, SEED, DEV_SEED, STREAM_SEED = 8, 8, 0, 7, 11
TARGET_PRECISION, LLM_BUDGET, LEARN_PRECISION, TOLERANCE = 0.95, 0.3, 0.85, 0.01  # the bar's budget: 30% to the LLM
CALIBRATE = (f"calibrate(target_precision={TARGET_PRECISION}, llm_budget={LLM_BUDGET}, learn_precision={LEARN_PRECISION}, "
             f"tolerance={TOLERANCE})")
LEARN_RULE = ("the pooled probability of the answer; the policy kept after retrains (the retrained fallback calibrated "
              "again); prompts show people's labels only")
TIMEOUT_S = 600.0  # per text: a benchmark measures answers, not how the cascade degrades on a loaded machine
STREAM_CHUNK, STREAM_WINDOW = 20, 200
RETRAIN_EVERY = Policy.model_fields["retrain_every"].default  # the product's default
ALL_DATASETS = DATASETS + CHINESE
WIN_BAR = 5  # of the seven datasets
TUNED = "tuned"  # --student: the body tuned on the pool (embedder "tuned") instead of the frozen one 'auto' picks
MANY_LABELS = 10  # scoring every label is the LLM arms' cost: 77 labels take several seconds per text on 2 cores


def open_engine(spec: str, args):
    """The LLM engine a spec names, on --threads llama.cpp threads where it is llama.cpp."""
    return load_engine(spec, n_threads=args.threads) if spec.startswith("llamacpp:") else load_engine(spec)


def engine_title(engine) -> str:
    """The engine's spec and, for the packaged GGUFs, which model it is."""
    model = llamacpp_model_title(engine.spec.partition(":")[2]) if engine.spec.startswith("llamacpp") else None
    return engine.spec + (f" ({model})" if model else "")


def prepare(data: Path, name: str, args) -> dict:
    folder = data / name
    meta = json.loads((folder / "labels.json").read_text(encoding="utf-8"))
    descriptions = meta.get("descriptions") or {}
    task = Task.build({"name": name, "labels": [{"name": n, "description": descriptions.get(n, "")} for n in meta["labels"]]})
    train, test = read_jsonl(folder / "train.jsonl"), read_jsonl(folder / "test.jsonl")
    picked = per_class_draw(train, getattr(args, "pool_seed", SEED), name)  # bench/stream_replay.py draws other pools
    pool = [train[i] for label in sorted(picked) for i in picked[label][:SHOTS]]
    used = {row["text"] for row in pool}
    rest = [row for row in train if row["text"] not in used]
    unlabeled = folder / "unlabeled.jsonl"  # eprstmt's texts for learning streams (its train split holds 320)
    from_train = 0 if unlabeled.is_file() else args.stream_size
    order = random.Random(DEV_SEED).sample(range(len(rest)), min(len(rest), args.dev_size + from_train))
    dev = [rest[i] for i in order[: args.dev_size]]
    stream = [rest[i] for i in order[args.dev_size :]]
    if unlabeled.is_file():
        texts = read_jsonl(unlabeled)
        stream = [texts[i] for i in random.Random(STREAM_SEED).sample(range(len(texts)), min(len(texts), args.stream_size))]
    shuffled = getattr(args, "test_order", "shuffled") == "shuffled"  # reruns of an earlier result keep its order
    test = (shuffled_test_sample if shuffled else test_sample)(test, args.test_size)[: args.limit]
    return {"name": name, "task": task, "pool": pool, "dev": dev, "stream": stream, "test": test,
            "stream_source": (f"unlabeled.jsonl (random.Random({STREAM_SEED}) order)" if unlabeled.is_file()
                              else f"training texts outside pool and dev (random.Random({DEV_SEED}) order)")}


class Embedders:
    """The packaged embedders, each loaded once per run, and the one 'auto' picks for a dataset's pool. Texts they
    embed while choosing (the pool, in cross-validation) are kept, so the chosen one does not embed the pool again."""

    def __init__(self):
        self.loaded = {}

    def load(self, spec: str) -> Vectors:
        if spec not in self.loaded:
            self.loaded[spec] = Vectors(load_embedder(spec))
        return self.loaded[spec]

    def for_pool(self, ds: dict) -> PoolVectors:
        texts, labels = texts_labels(ds["pool"])
        chosen = self.load(chosen_embedder(ds["task"], texts, [[label] for label in labels], load=self.load))
        return PoolVectors(chosen.embedder, dict(zip(texts, chosen.embed(texts), strict=True)))


class PoolVectors:
    """An embedder that embeds the pool's texts once per run, since every arm builds its session on the same pool
    (multilingual-e5-small takes minutes for csldcp's 536 pool texts on 2 cores); other texts are embedded at every
    call, so an arm's texts/s still includes embedding the texts it classifies."""

    def __init__(self, embedder, pool: dict[str, np.ndarray]):
        self.embedder, self.id, self.dim, self.pool = embedder, embedder.id, embedder.dim, pool

    def __deepcopy__(self, memo) -> PoolVectors:  # shared, not copied, as the packaged embedders are
        return self

    def embed(self, texts, batch_size: int = 32) -> np.ndarray:
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        others = [text for text in texts if text not in self.pool]
        fresh = dict(zip(others, self.embedder.embed(others, batch_size) if others else [], strict=True))
        return np.stack([self.pool[text] if text in self.pool else fresh[text] for text in texts]).astype(np.float32)


def texts_labels(rows: list[dict]) -> tuple[list[str], list[str]]:
    return [row["text"] for row in rows], [row["label"] for row in rows]


def scores(gold: list[str], predicted: list, seconds: float, routes: list | None = None) -> dict:
    result = {
        "n": len(gold), "accuracy": accuracy_score(gold, predicted),
        "macro_f1": f1_score(gold, predicted, average="macro", zero_division=0), "texts_per_s": len(gold) / seconds,
    }
    if routes is not None:
        result["llm_share"] = float(np.mean([route is Route.LLM for route in routes]))
        result["degraded"] = int(sum(route is Route.DEGRADED for route in routes))
    return result


def timed_classify(session: Session, texts: list[str]) -> tuple[list, float]:
    began = time.perf_counter()
    predictions = session.classify(texts)
    return predictions, time.perf_counter() - began


def run_classifier(session: Session, texts: list[str], gold: list[str]) -> dict:
    predictions, seconds = timed_classify(session, texts)
    return scores(gold, [p.label for p in predictions], seconds, [p.route for p in predictions])


def new_classifier(ds: dict, embedder, engine, policy: Policy | None = None) -> Session:
    policy = (policy or Policy()).model_copy(update={"timeout_s": TIMEOUT_S})
    session = Session.create(ds["task"], embedder=embedder, engine=engine, policy=policy)
    session.add_examples(*texts_labels(ds["pool"]), retrain=True)
    return session


def run_dataset(ds: dict, embedder, engine, args) -> dict:
    name, labels = ds["name"], ds["task"].label_names
    test_texts, test_gold = texts_labels(ds["test"])
    n_llm = min(len(test_texts), args.llm_texts if len(labels) <= MANY_LABELS else args.llm_texts_many_labels)
    arms, extra = {}, {}

    log(f"  {name}: svm")
    predictions, seconds = timed_classify(new_classifier(ds, embedder, None), test_texts)
    answered = [p.label for p in predictions]
    arms["svm"] = scores(test_gold, answered, seconds)
    extra["svm_on_llm_texts"] = scores(test_gold[:n_llm], answered[:n_llm], seconds)

    log(f"  {name}: k-NN")
    pool_texts, pool_gold = texts_labels(ds["pool"])
    began = time.perf_counter()
    knn = KNeighborsClassifier(n_neighbors=K, metric="cosine").fit(embedder.embed(pool_texts), pool_gold)
    arms["knn"] = scores(test_gold, knn.predict(embedder.embed(test_texts)).tolist(), time.perf_counter() - began)

    for arm, examples in (("llm zero-shot", 0), ("llm few-shot", K)):
        log(f"  {name}: {arm} on {n_llm} texts")
        alone = Policy(accept_threshold=1.0, llm_weight=1.0, examples=examples, max_candidates=len(labels), learn=False)
        arms[arm] = run_classifier(new_classifier(ds, embedder, engine, alone), test_texts[:n_llm], test_gold[:n_llm])

    cascade, found = run_cascade(ds, embedder, engine, n_llm)
    arms["cascade"] = found.pop("cascade")
    extra.update(found)

    if not args.no_setfit and name not in CHINESE:
        extra.update(run_setfit(ds))
        arms["setfit"] = extra.pop("setfit")
    log(f"  {name}: " + ", ".join(f"{arm} {100 * r['accuracy']:.1f}%" for arm, r in arms.items()))
    return {"dataset": name, "labels": len(labels), "embedder": embedder.id, "pool": len(ds["pool"]), "dev": len(ds["dev"]), "llm_texts": n_llm,
            "arms": arms, **extra, "_classifier": cascade}


def run_cascade(ds: dict, embedder, engine, n_llm: int, layouts: list[tuple[int, int]] | None = None,
                student: str = "auto") -> tuple[Session, dict]:
    """The calibrated cascade arm: on all test texts, on the LLM arms' first `n_llm`, and its candidate recall;
    with `student="tuned"` also the tuned student alone (the svm arm over the tuned body)."""
    cascade, calibration = calibrated_classifier(ds, embedder, engine, layouts, student)
    test_texts, test_gold = texts_labels(ds["test"])
    found = {}
    if student == TUNED:
        log(f"  {ds['name']}: the tuned student alone on {len(test_texts)} texts")
        began = time.perf_counter()
        answered = fallback_answers(cascade, test_texts)
        seconds = time.perf_counter() - began
        found = {"svm": scores(test_gold, answered, seconds), "svm_on_llm_texts": scores(test_gold[:n_llm], answered[:n_llm], seconds),
                 "student": {"embedder": cascade.embedder.id, "tune_seconds": calibration.pop("tune_seconds")}}
    log(f"  {ds['name']}: cascade on {len(test_texts)} texts")
    predictions, seconds = timed_classify(cascade, test_texts)
    answered, routes = [p.label for p in predictions], [p.route for p in predictions]
    return cascade, found | {"cascade": scores(test_gold, answered, seconds, routes), "calibration": calibration,
                             "cascade_on_llm_texts": scores(test_gold[:n_llm], answered[:n_llm], seconds, routes[:n_llm]),
                             "candidate_recall_test": candidate_recall(cascade, test_texts, test_gold)}


def same_texts_as(result: dict, args) -> None:
    """Set `args` so that `prepare` draws the dev and test texts of an earlier result, in its order (file order for
    runs before the sample was shuffled)."""
    for key in ("test_size", "dev_size", "limit"):
        setattr(args, key, result["settings"][key])
    args.test_order = result["settings"].get("test_order", "file")


def rerun_cascade(args) -> None:
    """Redo only the calibrated cascade arm of an earlier run (same pool, dev and test texts), then bars and markdown:
    the other arms (svm, k-NN, the LLM alone, SetFit) do not depend on calibration."""
    result = json.loads(args.out.read_text(encoding="utf-8"))
    same_texts_as(result, args)
    embedders, engine = Embedders(), open_engine(result["settings"].get("engine_spec", DEFAULT_ENGINE), args)
    rows = {row["dataset"]: row for row in result["datasets"]}
    for name in args.datasets:  # in the order given
        ds = prepare(args.data, name, args)
        session, found = run_cascade(ds, embedders.for_pool(ds), engine, rows[name]["llm_texts"], args.layouts, args.student)
        session.close()
        if args.student == TUNED:  # the svm arm becomes the tuned student; the frozen one's is kept beside it
            row = rows[name]
            row["frozen_svm"] = row.get("frozen_svm", row["arms"]["svm"])
            row["frozen_svm_on_llm_texts"] = row.get("frozen_svm_on_llm_texts", row["svm_on_llm_texts"])
            row["arms"]["svm"], row["svm_on_llm_texts"] = found.pop("svm"), found.pop("svm_on_llm_texts")
        rows[name]["arms"]["cascade"] = found.pop("cascade")
        rows[name].update(found, cascade_rerun=dt.date.today().isoformat())
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")  # keep what is done
    engine.close()
    compared = f", layouts={args.layouts}" if args.layouts else ""
    redone = ("the cascade and svm arms rerun with the student's body tuned on the pool (embedder 'tuned'; the svm arm "
              "is that student alone, the frozen body's kept as frozen_svm in the JSON)" if args.student == TUNED
              else "the cascade arm rerun")
    result["settings"]["calibrate"] = (f"{CALIBRATE.removesuffix(')')}{compared}) ({redone} on "
                                       f"{dt.date.today().isoformat()} with {args.threads or 2} llama.cpp thread(s); the "
                                       "other arms from the first run)")
    result["bars"] = evaluate_bars(result)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    if not args.no_markdown:
        write_markdown(result, args)


def calibrated_classifier(ds: dict, embedder, engine, layouts: list[tuple[int, int]] | None = None,
                          student: str = "auto") -> tuple[Session, dict]:
    """The pool's session calibrated on the dev set (learning off), and the calibration report; `layouts`: the prompt
    layouts calibrate compares (None: calibrate's default, the policy's own and the cached one; the report's notes
    say which it kept). `student="tuned"`: the session's body is tuned on the pool first, as
    `Session.create(embedder="tuned")` does (`embedder` is then only the frozen body 'auto' picked)."""
    if student == TUNED:
        log(f"  {ds['name']}: tuning the student's body on the {len(ds['pool'])} pool texts")
        began = time.perf_counter()
        session = Session.create(ds["task"], embedder=TUNED, engine=engine, examples=texts_labels(ds["pool"]),
                                 policy=Policy(learn=False, timeout_s=TIMEOUT_S))
        tuned = {"tune_seconds": time.perf_counter() - began}
        log(f"    tuned {session.embedder.id} in {tuned['tune_seconds']:.0f} s")
    else:
        session, tuned = new_classifier(ds, embedder, engine, Policy(learn=False)), {}
    log(f"  {ds['name']}: calibrating on {len(ds['dev'])} dev texts")
    began = time.perf_counter()
    report = session.calibrate(*texts_labels(ds["dev"]), target_precision=TARGET_PRECISION, llm_budget=LLM_BUDGET,
                                  learn_precision=LEARN_PRECISION, tolerance=TOLERANCE, layouts=layouts)
    log("    " + report.table().replace("\n", "\n    "))
    return session, report.model_dump(mode="json") | {"seconds": time.perf_counter() - began} | tuned


def rerun_stream(args) -> None:
    """Redo only the stream of an earlier run (same pool, dev, stream and test texts), then bars and markdown; with
    no earlier run in --out, a result of streams alone, on the --test-size and --dev-size given."""
    load = [round(x, 1) for x in os.getloadavg()]
    t0 = time.monotonic()
    if args.out.exists():
        result = json.loads(args.out.read_text(encoding="utf-8"))
        same_texts_as(result, args)
        args.engine = result["settings"].get("engine_spec", DEFAULT_ENGINE)  # the earlier run's engine
    embedders, engine = Embedders(), open_engine(args.engine, args)
    if not args.out.exists():
        result = {"date": dt.date.today().isoformat(), "datasets": [], "settings": {
            "datasets": [], "test_size": args.test_size, "dev_size": args.dev_size, "limit": args.limit, "calibrate": CALIBRATE,
            "engine": engine_title(engine), "engine_spec": args.engine, "test_order": "shuffled", "llama_threads": args.threads}}
    ds = prepare(args.data, args.stream_dataset, args)
    session, calibration = calibrated_classifier(ds, embedders.for_pool(ds), engine, student=args.student)
    before = run_classifier(session, *texts_labels(ds["test"]))
    log(f"{ds['name']}: stream of {len(ds['stream'])} texts")
    stream = run_stream(ds, session, before, args.retrain_every) | {
        "calibration": calibration, "source": ds["stream_source"], "rerun": dt.date.today().isoformat(), "seconds": time.monotonic() - t0,
        "llama_threads": args.threads, "load_start": load, "student": args.student}
    result["streams"] = [s for s in streams(result) if same_stream(s) != same_stream(stream)]
    result["streams"].append(stream)
    result.pop("stream", None)
    session.close()
    engine.close()
    result["bars"] = evaluate_bars(result)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    if not args.no_markdown:
        write_markdown(result, args)


def run_setfit(ds: dict) -> dict:
    from setfit_anchor import setfit_predict  # needs the bench extra: pip install -e '.[bench]'

    log(f"  {ds['name']}: SetFit")
    (pool_texts, pool_gold), (test_texts, test_gold) = texts_labels(ds["pool"]), texts_labels(ds["test"])
    result = setfit_predict(pool_texts, pool_gold, test_texts, seed=SEED)
    arm = scores(test_gold, result["predictions"], result["predict_seconds"]) | {"train_seconds": result["train_seconds"]}
    return {"setfit": arm, "setfit_settings": result["settings"]}


def add_setfit(args) -> None:
    """Add the SetFit arm to the datasets of an earlier run (same pool and test texts), then redo bars and markdown."""
    result = json.loads(args.out.read_text(encoding="utf-8"))
    same_texts_as(result, args)
    for row in result["datasets"]:
        found = run_setfit(prepare(args.data, row["dataset"], args))
        row["arms"]["setfit"] = found["setfit"]
        row["setfit_settings"] = found["setfit_settings"]
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    result["bars"] = evaluate_bars(result)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    if not args.no_markdown:
        write_markdown(result, args)


def candidate_recall(session: Session, texts: list[str], gold: list[str]) -> float | None:
    """Share of the test texts the cascade sends to the LLM whose true label is among the candidates it narrows to."""
    from labelcascade.agent.candidates import top_candidates

    cascade = session.cascade
    vectors = cascade.embedder.embed(texts)
    proba = cascade.probabilities(vectors, texts)
    sent = np.flatnonzero(~cascade.policy.accepts(cascade.certainty(proba)))
    if not cascade.policy.asks_llm or not len(sent):
        return None
    neighbors = cascade.neighbors(vectors[sent])
    names = cascade.task.label_names
    hits = [names.index(gold[i]) in top_candidates(proba[i], row, names, cascade.policy.max_candidates)
            for i, row in zip(sent, neighbors, strict=True)]
    return float(np.mean(hits))


def run_stream(ds: dict, session: Session, before: dict, retrain_every: int = RETRAIN_EVERY) -> dict:
    """Feed unlabelled texts to the calibrated session with learning on; measure what it sends to the LLM."""
    test_texts, test_gold = texts_labels(ds["test"])
    fallback_before = fallback_accuracy(session, test_texts, test_gold)
    session.set_policy(session.policy.model_copy(update={"learn": True, "retrain_every": retrain_every}))
    texts = [row["text"] for row in ds["stream"]]
    windows, routes, began = [], [], time.perf_counter()
    fallback, retrains = session.cascade.fallback, 0
    for start in range(0, len(texts), STREAM_CHUNK):
        routes += [p.route for p in session.classify(texts[start : start + STREAM_CHUNK])]
        if session.cascade.fallback is not fallback:  # learning retrained it (one retrain per call at most)
            fallback, retrains = session.cascade.fallback, retrains + 1
        if len(routes) % STREAM_WINDOW == 0 or len(routes) == len(texts):
            window = routes[len(windows) * STREAM_WINDOW :]
            accept = session.policy.accept_threshold
            windows.append({"texts": len(window), "llm_share": float(np.mean([r is Route.LLM for r in window])),
                            "llm_examples": session.store.count("llm"), "seconds": time.perf_counter() - began,
                            "retrains": retrains, "accept_threshold": accept})
            log(f"    stream window {len(windows)}: LLM share {windows[-1]['llm_share']:.1%}, "
                f"{windows[-1]['llm_examples']} LLM examples stored; after {retrains} retrains: accept {accept:.3f}")
    session.set_policy(session.policy.model_copy(update={"learn": False}))
    after = run_classifier(session, test_texts, test_gold)
    return {"dataset": ds["name"], "learn_rule": LEARN_RULE, "stream_texts": len(texts), "chunk": STREAM_CHUNK, "retrain_every": retrain_every,
            "policy": session.policy.model_dump(), "windows": windows, "cascade_before": before, "cascade_after": after,
            "fallback_before": fallback_before, "fallback_after": fallback_accuracy(session, test_texts, test_gold)}


def same_stream(stream: dict) -> tuple:
    """What a stream is a rerun of: a new run replaces the earlier one with the same dataset, rule and retraining."""
    return stream["dataset"], stream["learn_rule"], stream.get("retrain_every", RETRAIN_EVERY), stream.get("student", "auto")


def retraining(stream: dict) -> str:
    every = stream.get("retrain_every", RETRAIN_EVERY)
    return "" if every == RETRAIN_EVERY else f", retraining every {every} LLM labels"


def learn_threshold(stream: dict) -> float:
    """The learn threshold calibration chose before the stream (under the rules before 2026-12-07, which chose the
    policy again after each retrain, the policy after it may have another)."""
    return (stream.get("calibration") or {}).get("policy", stream["policy"])["learn_threshold"]


def fallback_answers(session: Session, texts: list[str]) -> list[str]:
    """The session's fallback's answers alone (no LLM), whatever its policy."""
    cascade = session.cascade
    proba = cascade.probabilities(cascade.embedder.embed(texts), texts)
    return [cascade.task.label_names[i] for i in proba.argmax(axis=1)]


def fallback_accuracy(session: Session, texts: list[str], gold: list[str]) -> float:
    return accuracy_score(gold, fallback_answers(session, texts))


def evaluate_bars(result: dict) -> list[dict]:
    bars, wins, measured = [], 0, []
    if not result["datasets"]:  # streams alone (--stream-only into a new --out)
        return stream_bars(result)
    for row in result["datasets"]:
        arms = row["arms"]
        same = row["cascade_on_llm_texts"]  # the cascade on the texts the LLM arms saw, so the comparison is fair
        best = max(row["svm_on_llm_texts"]["accuracy"], arms["llm few-shot"]["accuracy"])
        ok = same["accuracy"] >= best and arms["cascade"]["llm_share"] <= LLM_BUDGET
        wins += ok
        # the share on the same texts as the accuracies; the budget holds over the whole test set
        measured.append(f"{row['dataset']} {100 * same['accuracy']:.1f} vs {100 * best:.1f} at {same['llm_share']:.0%} LLM "
                        f"({arms['cascade']['llm_share']:.0%} of all {arms['cascade']['n']})")
    complete = len(result["datasets"]) == len(ALL_DATASETS)
    bars.append({"bar": f"cascade accuracy >= max(svm, llm few-shot) with <= {LLM_BUDGET:.0%} sent to the LLM, on >= {WIN_BAR} of {len(ALL_DATASETS)} datasets",
                 "measured": f"{wins}/{len(result['datasets'])}: " + "; ".join(measured), "pass": wins >= WIN_BAR if complete else None})
    return bars + stream_bars(result)


def stream_bars(result: dict) -> list[dict]:
    """Issue 14's stream bar for each stream: the LLM share in the last window <= half the first, accuracy not lower."""
    bars = []
    for stream in streams(result):
        if len(stream["windows"]) < 2:
            continue
        first, last = stream["windows"][0]["llm_share"], stream["windows"][-1]["llm_share"]
        holds = last <= first / 2 and stream["cascade_after"]["accuracy"] >= stream["cascade_before"]["accuracy"]
        bars.append({"bar": f"stream ({stream['dataset']}, learning from {stream['learn_rule']}{retraining(stream)}): LLM share in the last window "
                            "<= half the first, test accuracy not lower",
                     "measured": f"{first:.1%} -> {last:.1%}; cascade accuracy {100 * stream['cascade_before']['accuracy']:.1f} -> "
                                 f"{100 * stream['cascade_after']['accuracy']:.1f}", "pass": holds})
        if first == 0:  # calibration sent nothing to the LLM from the start: there is no share to halve
            bars[-1] |= {"pass": None, "na": "nothing sent to the LLM from the start"}
    return bars


ARM_ORDER = ["svm", "knn", "setfit", "llm zero-shot", "llm few-shot", "cascade"]


def arms_section(result: dict, heading: str = ARMS_HEADING, out: Path = DEFAULT_OUT) -> str:
    s, out = result["settings"], out.resolve()
    lines = [heading, "", f"Generated by `.venv/bin/python bench/cascade.py` on {result['date']} ({run_time(result)}); "
             f"raw numbers in `{out.relative_to(REPO) if out.is_relative_to(REPO) else out}`. Do not edit by hand: the script rewrites this section.", "",
             f"Settings: pool {SHOTS}/class (seed {SEED}, = bench/fallback.py's 8/class set); dev {s['dev_size']} training texts outside the pool "
             f"(random.Random({DEV_SEED})); test {s['test_size']} texts (fixed sample, random.Random({TEST_SEED}){test_order(s)}){limited(s)}; LLM-only arms on the first "
             f"--llm-texts {s['llm_texts']} of them ({s['llm_texts_many_labels']} with > {MANY_LABELS} labels); engine {s['engine']}; {embedders_cell(result)}; cascade = {s['calibrate']}, learning off; k-NN k={K} cosine; texts/s = wall time of classify incl. embedding; "
             f"{s['machine']['cpu_count']} shared CPU cores, load {s['machine']['load_start']} at start, {s['machine'].get('load_end', 'not recorded')} at end.",
             *(["", f"**Note:** {s['note']}"] if s.get("note") else []),
             "", "| dataset | arm | n | acc % | macro-F1 % | sent to LLM | texts/s |", "|---|---|---:|---:|---:|---:|---:|"]
    for row in result["datasets"]:
        for arm in [a for a in ARM_ORDER if a in row["arms"]]:
            r = row["arms"][arm]
            share = f"{r['llm_share']:.0%}" if "llm_share" in r else "—"
            lines.append(f"| {row['dataset']} | {arm} | {r['n']} | {100 * r['accuracy']:.1f} | {100 * r['macro_f1']:.1f} | {share} | {r['texts_per_s']:.2f} |")
        same = row["cascade_on_llm_texts"]
        lines.append(f"| {row['dataset']} | cascade, first {same['n']} | {same['n']} | {100 * same['accuracy']:.1f} | {100 * same['macro_f1']:.1f} "
                     f"| {same['llm_share']:.0%} | — |")
    lines += ["", "Calibration (dev set) per dataset:", "", "| dataset | accept | LLM weight | LLM temp | candidates | dev: fallback acc | dev: cascade acc "
              "| dev: sent to LLM | candidate recall dev / test | learn from (dev: share of LLM answers, precision) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in result["datasets"]:
        c, p = row["calibration"], row["calibration"]["policy"]
        recall = "/".join("—" if v is None else f"{v:.3f}" for v in (c["candidate_recall"], row["candidate_recall_test"]))
        lines.append(f"| {row['dataset']} | {p['accept_threshold']:.3f} | {p['llm_weight']:.1f} | {p['llm_temperature']:.2f} | {p['max_candidates']} "
                     f"| {100 * c['fallback_accuracy']:.1f} | {100 * c['cascade_accuracy']:.1f} | {c['llm_share']:.0%} | {recall} | {learn_cell(c)} |")
    lines += ["", "| bar | measured | result |", "|---|---|---|"]
    for bar in result["bars"]:
        verdict = f"n/a ({bar.get('na', f'not all {len(ALL_DATASETS)} datasets run')})" if bar["pass"] is None else ("**PASS**" if bar["pass"] else "**FAIL**")
        lines.append(f"| {bar['bar']} | {bar['measured']} | {verdict} |")
    return "\n".join(lines + [""])


def run_time(result: dict) -> str:
    if "run_seconds" in result:
        return f"run time {result['run_seconds']:.0f} s"
    done = ", ".join(row["dataset"] for row in result["datasets"])
    return f"stopped before its end: of {', '.join(result['settings']['datasets'])}, only {done} finished"


def test_order(settings: dict) -> str:
    """How the sample was ordered before the LLM arms and --limit took their first n."""
    if settings.get("test_order") == "shuffled":
        return ", shuffled (seeded): the first n are a random subset"
    return ", in file order: on banking77 and csldcp, grouped by label, the first n cover few labels"


def limited(settings: dict) -> str:
    return f", the first {settings['limit']} of them (--limit: a smoke run)" if settings.get("limit") else ""


def embedders_cell(result: dict) -> str:
    if "embedder" in result["settings"]:  # runs before the per-dataset choice: one embedder for all
        return f"embedder {result['settings']['embedder']}"
    chosen = ", ".join(f"{row['dataset']} {row['embedder']}" + (" tuned on the pool (embedder 'tuned')" if "student" in row else "")
                       for row in result["datasets"])
    return f"embedder per dataset, as `embedder='auto'` picks it from the pool: {chosen}"


def learn_cell(calibration: dict) -> str:
    threshold = calibration["policy"]["learn_threshold"]
    if calibration.get("learned_precision") is None:
        return f"{threshold:.3f} (learns nothing)" if calibration["policy"]["llm_weight"] > 0 else "—"
    return f"{threshold:.3f} ({calibration['learned_share']:.0%}, {calibration['learned_precision']:.3f})"


def streams(result: dict) -> list[dict]:
    """The streams of a result (older results kept one, under "stream", learning from the pooled probability)."""
    if "stream" in result:
        return [{"learn_rule": "the pooled probability of the answer"} | result["stream"]]
    return result.get("streams", [])


def stream_section(result: dict, heading: str = STREAM_HEADING) -> str:
    st = result["settings"]
    lines = [heading, "", "Generated by `bench/cascade.py` with its arms' section, or alone by `--stream-only` (each stream then "
             f"calibrated on its own dev set of {st['dev_size']} texts by {st['calibrate']}, as the arms' cascade is; test "
             f"{st['test_size']} texts, the fixed sample of bench/common.py). Each stream: unlabelled texts (training texts outside pool and dev in "
             f"random.Random({DEV_SEED}) order; a dataset's unlabeled.jsonl where it has one) fed {STREAM_CHUNK} per classify call to the calibrated session with learning on, "
             f"retraining every {RETRAIN_EVERY} LLM labels unless said otherwise; test accuracy before and after on the section's test texts.", ""]
    for stream in streams(result):
        rerun = f", rerun on {stream['rerun']} after the arms" if stream.get("rerun") and result["datasets"] else ""
        source = f" from {stream['source']}" if "source" in stream else ""
        tuned = ", the student's body tuned on the pool (embedder 'tuned')" if stream.get("student") == TUNED else ""
        lines += [f"**{stream['dataset']}**{tuned}, {stream['stream_texts']} texts{source}, learning from LLM answers where {stream['learn_rule']} is at "
                  f"least {learn_threshold(stream):.3f} (calibrated for {LEARN_PRECISION} precision on the dev set){retraining(stream)}{rerun}:", "",
                  "| window | texts | sent to LLM | LLM examples stored | elapsed s |", "|---:|---:|---:|---:|---:|"]
        for i, w in enumerate(stream["windows"], 1):
            lines.append(f"| {i} | {w['texts']} | {w['llm_share']:.1%} | {w['llm_examples']} | {w['seconds']:.0f} |")
        b, a = stream["cascade_before"], stream["cascade_after"]
        lines += ["", f"Test ({b['n']} texts): cascade accuracy {100 * b['accuracy']:.1f}% -> {100 * a['accuracy']:.1f}% "
                  f"(sent to LLM {b['llm_share']:.0%} -> {a['llm_share']:.0%}); fallback alone {100 * stream['fallback_before']:.1f}% -> "
                  f"{100 * stream['fallback_after']:.1f}%.", ""]
        if "load_start" in stream:
            lines[-1:] = [f"Run on {stream.get('rerun', result['date'])}: {stream['seconds']:.0f} s in all, llama.cpp threads "
                          f"{stream['llama_threads'] or 2}, 1/5/15-min load {stream['load_start']} at the start.", ""]
    if not result["datasets"]:  # streams alone: their bars are not in an arms' section
        lines += ["| bar | measured | result |", "|---|---|---|"]
        lines += [f"| {bar['bar']} | {bar['measured']} | "
                  + (f"n/a ({bar['na']})" if bar["pass"] is None else "**PASS**" if bar["pass"] else "**FAIL**") + " |"
                  for bar in stream_bars(result)]
        lines.append("")
    return "\n".join(lines)


def write_markdown(result: dict, args) -> None:
    """The arms' section under --heading and, when the run has one, the stream's section, in --markdown."""
    path, heading = args.markdown, "## " + args.heading
    if result["datasets"]:
        write_markdown_section(path, heading, arms_section(result, heading, args.out))
    if streams(result):
        stream_heading = "## " + args.stream_heading
        write_markdown_section(path, stream_heading, stream_section(result, stream_heading))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=ALL_DATASETS, choices=ALL_DATASETS)
    parser.add_argument("--test-size", type=int, default=500)
    parser.add_argument("--dev-size", type=int, default=200)
    parser.add_argument("--llm-texts", type=int, default=200, help="test texts for the LLM-only arms (the first n)")
    parser.add_argument("--llm-texts-many-labels", type=int, default=100,
                        help=f"the same for datasets with more than {MANY_LABELS} labels")
    parser.add_argument("--stream-dataset", default="ag_news", choices=ALL_DATASETS)
    parser.add_argument("--stream-size", type=int, default=2000)
    parser.add_argument("--limit", type=int, help="at most this many test texts (smoke runs)")
    parser.add_argument("--engine", default=DEFAULT_ENGINE, help="the LLM engine's spec (labelcascade.agent.engines.load_engine), "
                        "e.g. llamacpp:qwen-1.5b once `labelcascade install-model qwen-1.5b` has run")
    parser.add_argument("--threads", type=int, help="llama.cpp threads (default 2 here); 1 keeps its speed when other "
                        "processes share the CPU, where 2 threads collapse")
    parser.add_argument("--no-setfit", action="store_true")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--markdown", type=Path, default=MARKDOWN)
    parser.add_argument("--heading", default=ARMS_HEADING[3:], help="the BENCHMARKS.md section of the arms to (re)write "
                        "(another one keeps a partial run apart from the full one)")
    parser.add_argument("--no-markdown", action="store_true")
    parser.add_argument("--markdown-only", action="store_true")
    parser.add_argument("--cascade-only", action="store_true",
                        help="only redo the calibrated cascade arm of the run in --out, for --datasets")
    parser.add_argument("--add-setfit", action="store_true", help="only add the SetFit arm to the results in --out")
    parser.add_argument("--layout", dest="layouts", action="append", metavar="STATIC:RETRIEVED",
                        type=lambda value: tuple(int(x) for x in value.split(":")),
                        help="with --cascade-only: a prompt layout calibrate compares (repeat: 0:8 and 8:0; one: no comparison); "
                             "default: calibrate's own (the policy's layout and the cached one)")
    parser.add_argument("--student", choices=["auto", TUNED], default="auto",
                        help="with --cascade-only or --stream-only: the student 'auto' picks (frozen body) or that body "
                             "tuned on the pool (embedder 'tuned'), which with --cascade-only also replaces the svm arm")
    parser.add_argument("--retrain-every", type=int, default=RETRAIN_EVERY,
                        help="stream: retrain the fallback after this many new LLM examples (Policy.retrain_every)")
    parser.add_argument("--stream-heading", default=STREAM_HEADING[3:], help="the BENCHMARKS.md section of the streams")
    parser.add_argument("--stream-only", action="store_true",
                        help="only redo the stream (calibrating again) for the results in --out")
    args = parser.parse_args(argv)
    if args.layouts and not args.cascade_only:
        parser.error("--layout goes with --cascade-only (an A/B of calibrate on an earlier run's texts)")
    if args.student != "auto" and not (args.cascade_only or args.stream_only):
        parser.error("--student goes with --cascade-only (the cascade and svm arms again, on an earlier run's texts) "
                     "or --stream-only")
    if args.cascade_only:
        rerun_cascade(args)
        return 0
    if args.add_setfit:
        add_setfit(args)
        return 0
    if args.stream_only:
        rerun_stream(args)
        return 0
    if args.markdown_only:
        result = json.loads(args.out.read_text(encoding="utf-8"))
        result["bars"] = evaluate_bars(result)  # by this code (a run stopped before its end has none yet)
        write_markdown(result, args)
        return 0
    t0, embedders, engine = time.monotonic(), Embedders(), open_engine(args.engine, args)
    settings = {"datasets": args.datasets, "test_size": args.test_size, "dev_size": args.dev_size, "llm_texts": args.llm_texts,
                "llm_texts_many_labels": args.llm_texts_many_labels,
                "limit": args.limit, "engine": engine_title(engine), "engine_spec": args.engine, "test_order": "shuffled",
                "llama_threads": args.threads, "calibrate": CALIBRATE,
                "machine": {"cpu_count": os.cpu_count(), "load_start": [round(x, 1) for x in os.getloadavg()],
                            "platform": platform.platform(), "python": platform.python_version()}}
    result = {"date": dt.date.today().isoformat(), "settings": settings, "datasets": []}
    earlier = streams(json.loads(args.out.read_text(encoding="utf-8"))) if args.out.exists() else []  # other rules' runs
    for name in args.datasets:
        ds = prepare(args.data, name, args)
        log(f"{name}: {len(ds['task'].labels)} labels, pool {len(ds['pool'])}, dev {len(ds['dev'])}, test {len(ds['test'])}")
        row = run_dataset(ds, embedders.for_pool(ds), engine, args)
        session = row.pop("_classifier")
        result["datasets"].append(row)
        if name == args.stream_dataset and args.stream_size:
            log(f"{name}: stream of {len(ds['stream'])} texts")
            stream = run_stream(ds, session, row["arms"]["cascade"], args.retrain_every)
            result["streams"] = [s for s in earlier if same_stream(s) != same_stream(stream)] + [stream]
        session.close()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")  # keep what is done
    settings["machine"]["load_end"] = [round(x, 1) for x in os.getloadavg()]
    result["run_seconds"] = time.monotonic() - t0
    result["bars"] = evaluate_bars(result)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    for bar in result["bars"]:
        log(f"{'n/a' if bar['pass'] is None else 'PASS' if bar['pass'] else 'FAIL'}: {bar['bar']}\n  {bar['measured']}")
    if not args.no_markdown:
        write_markdown(result, args)
    engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
