#!/usr/bin/env python
"""Learning rules for a stream, compared offline: the LLM's answers asked once, the stream replayed under each rule.

    .venv/bin/python bench/stream_replay.py collect sst2 --all-stream   # the LLM's answers (~10 min for sst2 here)
    .venv/bin/python bench/stream_replay.py replay sst2 --orders 5      # every rule, 5 stream orders (seconds)
    .venv/bin/python bench/stream_replay.py collect sst2 --all-stream --pool-seed 1   # another gold pool: sst2_seed1
    .venv/bin/python bench/stream_replay.py summary sst2 sst2_seed1 ag_news            # every rule over them all
    .venv/bin/python bench/stream_replay.py routing sst2 ag_news eprstmt   # which texts to send: other signals than the top probability

Why: a stream of bench/cascade.py --stream-only takes 4-12 minutes of LLM time per dataset and rule, and one stream
order says little (the bar compares two 200-text windows and 300 test texts). With prompts that show people's labels
only (the default), the LLM's answer to a text does not depend on what was learned: retrieval reads gold examples
only, and with every label a candidate (sst2, ag_news, eprstmt) the fallback does not narrow them. So its
log-probabilities can be asked once per text and the stream replayed under any learning rule, in any order, in
seconds.

`collect`: the session of bench/cascade.py's stream (same pool, dev and test texts, same calibrate settings), then the
LLM's log-probabilities for the test texts and for the stream texts (those the calibrated fallback sends to the LLM,
or all of them with --all-stream), saved under --cache (.cache/stream_replay, not committed).
`replay`: per rule and stream order, the stream fed 20 texts at a time as `Cascade.classify` would: texts under the
accept threshold pooled with the LLM's answer, answers at least the learn threshold stored as `llm` examples
(weighted as fallback/weights.py does), the fallback retrained on schedule (LinearSVMClassifier with the session's
text_features) and the policy chosen again on the dev set by `choose_policy`, with the rule's accuracy floor (and,
for "share capped", an LLM budget no higher than the dev share sent before the retrain; for "guarded", the retrained
fallback kept out when its cascade's dev accuracy is lower than the serving one's; for "policy kept", the policy
calibrated before the stream is kept and only the fallback changes, as the product does since 2026-12-07). A text
sent to the LLM whose answer was not collected counts as sent but teaches nothing ("unanswered": collect with
--all-stream to have none).
The cascade's test accuracy before and after uses the collected test answers.
`summary`: every rule over several collected streams (other gold pools: `collect --pool-seed N`, cached as
DATASET_seedN), with the stream bar's passes and the test accuracy gained or lost.
Checked: the rule shipped until 2026-12-05, in the first order, reproduces the streams of BENCHMARKS.md's "Learning
from a stream: ag_news, sst2, eprstmt" (sst2 windows 26.5% ... 28.0%, 49 LLM labels, 78.7 -> 78.7; ag_news 10.0% ...
1.5%, 80.3 -> 83.7).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from labelcascade.agent import Calibration, Cascade, DevSet, Policy, choose_policy
from labelcascade.agent.engines.llamacpp import LlamaCppEngine
from labelcascade.fallback import LinearSVMClassifier, sample_weights
from labelcascade.fallback.weights import SOURCE_WEIGHTS
from labelcascade.records import Source
from labelcascade.retrieval import ExampleStore
from labelcascade.session import DEV_FILE
from labelcascade.task import Task

from cascade import (
    LEARN_PRECISION, LLM_BUDGET, STREAM_CHUNK, STREAM_WINDOW, TARGET_PRECISION, TOLERANCE, Embedders, calibrated_classifier,
    prepare, texts_labels,
)
from common import DEFAULT_DATA, REPO, log

DEFAULT_CACHE = REPO / ".cache" / "stream_replay"


def cache_name(args) -> str:
    return args.dataset if args.pool_seed == 0 else f"{args.dataset}_seed{args.pool_seed}"


def collect(args) -> None:
    ds = prepare(args.data, args.dataset, args)
    engine = LlamaCppEngine(n_threads=args.threads)
    session, calibration = calibrated_classifier(ds, Embedders().for_pool(ds), engine)
    cascade, policy = session.cascade, session.cascade.policy

    def answers(texts: list[str]) -> np.ndarray:
        vectors = cascade.embedder.embed(texts)
        proba, neighbors = cascade.probabilities(vectors, texts), cascade.neighbors(vectors, policy)
        batch = policy.llm_batch
        return np.concatenate([cascade.llm_scores(texts[s:s + batch], proba[s:s + batch], neighbors[s:s + batch],
                                                  policy).logprobs for s in range(0, len(texts), batch)])

    test_texts, test_gold = texts_labels(ds["test"])
    stream = [row["text"] for row in ds["stream"]]
    stream_vectors = cascade.embedder.embed(stream)
    sent = ~policy.accepts(cascade.certainty(cascade.probabilities(stream_vectors, stream)))
    asked = np.arange(len(stream)) if args.all_stream else np.flatnonzero(sent)
    began = time.perf_counter()
    test_llm = answers(test_texts)
    stream_llm = answers([stream[i] for i in asked])
    name = cache_name(args)
    log(f"{name}: {len(test_texts)} test and {len(asked)} stream texts asked in {time.perf_counter() - began:.0f} s")
    pool_texts, pool_labels = texts_labels(ds["pool"])
    args.cache.mkdir(parents=True, exist_ok=True)
    np.savez(args.cache / f"{name}.npz", test_vectors=cascade.embedder.embed(test_texts), test_llm=test_llm,
             stream_vectors=stream_vectors, asked=asked, stream_llm=stream_llm, pool_vectors=cascade.embedder.embed(pool_texts))
    (args.cache / f"{name}_dev.npz").write_bytes((session.path / DEV_FILE).read_bytes())
    (args.cache / f"{name}.json").write_text(json.dumps({
        "labels": cascade.task.label_names, "policy": policy.model_dump(), "accuracy_floor": calibration["accuracy_floor"],
        "text_features": cascade.fallback.text_features, "test_texts": test_texts, "test_gold": test_gold,
        "stream": stream, "stream_gold": [row.get("label") for row in ds["stream"]], "pool_texts": pool_texts,
        "pool_labels": pool_labels, "embedder": cascade.embedder.id, "engine": engine.spec}), encoding="utf-8")
    session.close()
    engine.close()


@dataclass(frozen=True)
class Rule:
    """When to learn and retrain, and what the policy chosen after a retrain keeps."""

    every: int = 50  # retrain after this many new LLM examples (Policy.retrain_every)
    share: float | None = None  # ... or sooner: after this share of the examples the fallback was trained on (min 5)
    floor: str = "kept"  # kept: calibrate's best dev accuracy (until 2026-12-05); none: calibrate's rule; half: between
    capped: bool = False  # the LLM budget after a retrain: at most the dev share the policy sent before it
    guarded: bool = False  # a retrained fallback is kept only if its cascade's dev accuracy is not lower
    tolerance: float = TOLERANCE  # dev accuracy the policy chosen after a retrain may give up to send fewer texts
    learn_precision: float = LEARN_PRECISION  # not calibrate's: the stream's first policy is chosen again with it
    llm_weight: float = SOURCE_WEIGHTS[Source.LLM]  # an LLM label's weight in the retrain, times its confidence
    rechoose: bool = True  # False: the policy is kept as calibrated (thresholds, LLM weight), only the fallback changes


RULES = {
    "until 2026-12-05 (every 50, floor kept)": Rule(),
    "every 20, floor kept": Rule(every=20),
    "every 20, no floor": Rule(every=20, floor="none"),
    "every 50 or 25%, floor kept": Rule(share=0.25),
    "every 50 or 25%, no floor": Rule(share=0.25, floor="none"),
    "every 50 or 25%, half floor": Rule(share=0.25, floor="half"),
    "every 50 or 50%, no floor": Rule(share=0.5, floor="none"),
    "every 50, half floor": Rule(floor="half"),
    "every 50, no floor": Rule(floor="none"),
    "every 10, no floor": Rule(every=10, floor="none"),
    "every 10, no floor, share capped": Rule(every=10, floor="none", capped=True),
    "shipped (every 20, no floor, share capped)": Rule(every=20, floor="none", capped=True),
    "every 20, no floor, guarded": Rule(every=20, floor="none", guarded=True),
    "every 50, no floor, guarded": Rule(floor="none", guarded=True),
    "every 50 or 25%, no floor, guarded": Rule(share=0.25, floor="none", guarded=True),
    "every 10, no floor, guarded": Rule(every=10, floor="none", guarded=True),
    "every 50 or 25%, no floor, share capped": Rule(share=0.25, floor="none", capped=True),
    "shipped, tolerance 0": Rule(every=20, floor="none", capped=True, tolerance=0.0),
    "shipped, tolerance 0.005": Rule(every=20, floor="none", capped=True, tolerance=0.005),
    "shipped, learn 0.80": Rule(every=20, floor="none", capped=True, learn_precision=0.80),
    "shipped, tolerance 0, learn 0.80": Rule(every=20, floor="none", capped=True, tolerance=0.0, learn_precision=0.80),
    "shipped, tolerance 0, learn 0.75": Rule(every=20, floor="none", capped=True, tolerance=0.0, learn_precision=0.75),
    # "shipped": the product's rule from 2026-12-05 to 2026-12-07; since then it keeps the policy after a retrain of
    # the fallback alone and retrains every 50: "policy kept (every 50)"
    "policy kept (every 20)": Rule(every=20, rechoose=False),
    "policy kept (every 50)": Rule(every=50, rechoose=False),
    "policy kept (every 100)": Rule(every=100, rechoose=False),
    "policy kept (doubling)": Rule(every=10**9, share=1.0, rechoose=False),
    "policy kept (every 100 or doubling)": Rule(every=100, share=1.0, rechoose=False),
    "policy kept (every 200)": Rule(every=200, rechoose=False),
    "policy kept (every 20), LLM weight 1": Rule(every=20, rechoose=False, llm_weight=1.0),
    "policy kept (every 50), LLM weight 1": Rule(every=50, rechoose=False, llm_weight=1.0),
    "policy kept (every 100), LLM weight 1": Rule(every=100, rechoose=False, llm_weight=1.0),
    "policy kept (every 20), learn 0.80": Rule(every=20, rechoose=False, learn_precision=0.80),
    "policy kept (every 20), learn 0.75": Rule(every=20, rechoose=False, learn_precision=0.75),
}
MIN_NEW = 5


class Replay:
    """A collected dataset, replayed under rules."""

    def __init__(self, cache: Path, name: str):
        self.meta = json.loads((cache / f"{name}.json").read_text(encoding="utf-8"))
        self.arrays = dict(np.load(cache / f"{name}.npz"))
        self.dev = DevSet.load(cache / f"{name}_dev.npz")
        self.labels = self.meta["labels"]
        self.index = {label: i for i, label in enumerate(self.labels)}
        self.policy = Policy(**self.meta["policy"]).model_copy(update={"learn": True})  # calibrated with it off
        self.answers = dict(zip(self.arrays["asked"].tolist(), self.arrays["stream_llm"], strict=True))
        self.test_gold = np.array([self.index[g] for g in self.meta["test_gold"]])
        self.task = Task.from_labels(self.labels, name=name)

    def fit(self, vectors, labels, weights, texts) -> LinearSVMClassifier:
        return LinearSVMClassifier(text_features=self.meta["text_features"]).fit(
            vectors, labels, sample_weight=weights, texts=texts)

    def cascade(self, fallback, policy: Policy) -> Cascade:
        """The product's cascade for routing, the LLM's probabilities and pooling (no embedder, store or engine: the
        vectors and the LLM's log-probabilities are collected)."""
        return Cascade(self.task, None, fallback, policy=policy)

    def llm(self, cascade: Cascade, logprobs: np.ndarray) -> np.ndarray:
        policy = cascade.policy
        return cascade.llm_probabilities(logprobs, policy.llm_temperature, policy.llm_label_bias)

    @staticmethod
    def sent(cascade: Cascade, proba: np.ndarray) -> np.ndarray:
        """Which texts the cascade's policy sends to the LLM, as `Cascade.classify` routes them."""
        policy = cascade.policy
        return ~policy.accepts(cascade.certainty(proba)) if policy.asks_llm else np.zeros(len(proba), dtype=bool)

    def answered(self, fallback, policy: Policy, vectors, texts, llm) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The fallback's probabilities on the texts, the cascade's final ones and which texts were sent to the LLM;
        `llm(cascade, sent)`: the LLM's probabilities for the texts sent."""
        cascade = self.cascade(fallback, policy)
        proba = cascade.probabilities(vectors, texts)
        sent = self.sent(cascade, proba)
        final = proba.copy()
        final[sent] = cascade.pool(proba[sent], llm(cascade, sent), policy.llm_weight)
        return proba, final, sent

    def test(self, fallback, policy: Policy) -> tuple[float, float, float]:
        """Cascade accuracy, fallback accuracy and share sent to the LLM on the test texts."""
        proba, final, sent = self.answered(fallback, policy, self.arrays["test_vectors"], self.meta["test_texts"],
                                           lambda cascade, sent: self.llm(cascade, self.arrays["test_llm"][sent]))
        return (float(np.mean(final.argmax(1) == self.test_gold)), float(np.mean(proba.argmax(1) == self.test_gold)),
                float(sent.mean()))

    def on_dev(self, fallback, policy: Policy) -> tuple[float, float]:
        """The cascade's accuracy on the dev texts (with the LLM's collected dev answers where it would be asked) and
        the share of them it sends to the LLM: what `choose_policy` reports for the policy it chooses."""
        _, final, sent = self.answered(fallback, policy, self.dev.vectors, self.dev.texts,
                                       lambda cascade, sent: self.dev.llm[sent])
        return float(np.mean(final.argmax(axis=1) == self.dev.truth)), float(sent.mean())

    def run(self, rule: Rule, order_seed: int | None) -> dict:
        texts, vectors, truth = self.meta["stream"], self.arrays["stream_vectors"], self.meta["stream_gold"]
        order = np.arange(len(texts)) if order_seed is None else np.random.default_rng(order_seed).permutation(len(texts))
        gold_v, gold_y, gold_t = list(self.arrays["pool_vectors"]), list(self.meta["pool_labels"]), list(self.meta["pool_texts"])
        learned_v, learned_y, learned_t, learned_c, learned_right = [], [], [], [], []
        fallback, policy = self.fit(np.array(gold_v), gold_y, None, gold_t), self.policy
        if rule.learn_precision != LEARN_PRECISION:  # calibrate's choice, with the rule's learn precision
            policy = choose_policy(self.cascade(fallback, policy), self.dev, target_precision=TARGET_PRECISION,
                                   llm_budget=LLM_BUDGET, learn_precision=rule.learn_precision, tolerance=TOLERANCE,
                                   policy=policy).policy
        before = self.test(fallback, policy)
        serving = self.on_dev(fallback, policy)  # dev accuracy and LLM share of the serving fallback and policy
        sent_flags, unanswered, pending, retrains, rejected, trained_on = [], 0, 0, 0, 0, len(gold_y)
        for start in range(0, len(texts), STREAM_CHUNK):
            batch = order[start:start + STREAM_CHUNK]
            cascade = self.cascade(fallback, policy)
            proba = cascade.probabilities(vectors[batch], [texts[i] for i in batch])
            sent = self.sent(cascade, proba)
            for row, i in enumerate(batch):
                sent_flags.append(bool(sent[row]))
                if not sent[row]:
                    continue
                if i not in self.answers:
                    unanswered += 1
                    continue
                pooled = cascade.pool(proba[row], self.llm(cascade, self.answers[i][None])[0], policy.llm_weight)
                if policy.learn and pooled.max() >= policy.learn_threshold:
                    label = self.labels[int(pooled.argmax())]
                    learned_v.append(vectors[i]), learned_y.append(label), learned_t.append(texts[i])
                    learned_c.append(float(pooled.max())), learned_right.append(label == truth[i])
                    pending += 1
            due = rule.every if rule.share is None else min(rule.every, max(MIN_NEW, rule.share * trained_on))
            if pending >= due:
                weights = np.r_[np.ones(len(gold_y)), sample_weights(["llm"] * len(learned_y), learned_c)
                                * rule.llm_weight / SOURCE_WEIGHTS[Source.LLM]]
                retrained = self.fit(np.array(gold_v + learned_v), gold_y + learned_y, weights, gold_t + learned_t)
                pending, retrains, trained_on = 0, retrains + 1, len(gold_y) + len(learned_y)
                if not rule.rechoose:
                    fallback = retrained
                    continue
                chosen = self.choose(retrained, policy, rule, serving[1])
                if rule.guarded and chosen.cascade_accuracy < serving[0]:
                    rejected += 1
                    continue
                fallback, policy, serving = retrained, chosen.policy, (chosen.cascade_accuracy, chosen.llm_share)
        windows = [float(np.mean(sent_flags[k:k + STREAM_WINDOW])) for k in range(0, len(sent_flags), STREAM_WINDOW)]
        after = self.test(fallback, policy)
        return {"windows": windows, "before": before, "after": after, "llm_examples": len(learned_y), "retrains": retrains,
                "rejected": rejected, "learned_precision": float(np.mean(learned_right)) if learned_right else None,
                "unanswered": unanswered,
                "passes": after[0] >= before[0] and windows[-1] <= windows[0] / 2}

    def choose(self, fallback, policy: Policy, rule: Rule, dev_share: float) -> Calibration:
        """The policy chosen again after a retrain under `rule`, with its dev accuracy and LLM share."""
        budget = min(LLM_BUDGET, dev_share) if rule.capped else LLM_BUDGET
        choose = lambda floor: choose_policy(  # noqa: E731
            self.cascade(fallback, policy), self.dev, target_precision=TARGET_PRECISION, llm_budget=budget,
            learn_precision=rule.learn_precision, tolerance=rule.tolerance, accuracy_floor=floor, policy=policy)
        kept = self.meta["accuracy_floor"]
        if rule.floor == "kept":
            return choose(kept)
        if rule.floor == "none":
            return choose(None)
        best = choose(None).accuracy_floor  # the best reachable now, as calibrate would measure it
        return choose(max(kept, (kept + best) / 2))


def chosen_rules(args) -> list[tuple[str, Rule]]:
    return [(name, rule) for name, rule in RULES.items() if not args.rule or name in args.rule]


def replay(args) -> None:
    data = Replay(args.cache, cache_name(args))
    orders = [None, *range(1, args.orders)]
    print(f"{cache_name(args)} (gold pool seed {args.pool_seed}): {len(data.meta['stream'])} stream texts "
          f"({len(data.answers)} with the LLM's answer), "
          f"{len(data.test_gold)} test texts; orders: the collected one, then permutations 1..{args.orders - 1}\n")
    print("| rule | passes | test accuracy before -> after (per order) | LLM share, first -> last window | "
          "LLM examples (precision) | retrains | unanswered |")
    print("|---|---:|---|---|---|---|---|")
    for name, rule in chosen_rules(args):
        runs = [data.run(rule, seed) for seed in orders]
        after = " / ".join(f"{100 * r['after'][0]:.1f}" for r in runs)
        shares = " / ".join(f"{100 * r['windows'][0]:.0f}->{100 * r['windows'][-1]:.0f}" for r in runs)
        learned = " / ".join(f"{r['llm_examples']} ({100 * (r['learned_precision'] or 0):.0f}%)" for r in runs)
        retrains = " / ".join(f"{r['retrains']}" + (f" ({r['rejected']} kept out)" if r["rejected"] else "") for r in runs)
        unanswered = " / ".join(str(r["unanswered"]) for r in runs)
        print(f"| {name} | {sum(r['passes'] for r in runs)}/{len(runs)} | {100 * runs[0]['before'][0]:.1f} -> {after} | "
              f"{shares} | {learned} | {retrains} | {unanswered} |", flush=True)


def summary(args) -> None:
    """Every rule over several collected streams (cache names: sst2, sst2_seed1, ...), each in --orders orders."""
    data = [Replay(args.cache, name) for name in args.datasets]
    orders = [None, *range(1, args.orders)]
    print(f"{len(data)} collected streams ({', '.join(args.datasets)}), {args.orders} orders each\n")
    print("| rule | passes | test accuracy after - before, mean (min, max) | LLM share of the last window, mean | "
          "passes per stream |")
    print("|---|---:|---|---:|---|")
    for name, rule in chosen_rules(args):
        runs = {d.task.name: [d.run(rule, seed) for seed in orders] for d in data}
        every = [r for rs in runs.values() for r in rs]
        gain = np.array([100 * (r["after"][0] - r["before"][0]) for r in every])
        per = " / ".join(f"{sum(r['passes'] for r in rs)}" for rs in runs.values())
        print(f"| {name} | {sum(r['passes'] for r in every)}/{len(every)} | {gain.mean():+.1f} ({gain.min():+.1f}, "
              f"{gain.max():+.1f}) | {100 * np.mean([r['windows'][-1] for r in every]):.1f}% | {per} |", flush=True)


def routing(args) -> None:
    """Which texts to send: the cascade's answer at a share sent to the LLM when the texts it sends are the least sure
    by the fallback's top probability (what the product does) or by other cheap signals, on the collected test and
    dev texts (no stream, no learning). Oracle: the texts the fallback gets wrong and the pooled answer right
    first, those the pooled answer would get wrong last."""
    print("Cascade accuracy with a share of the texts sent to the LLM, chosen by each signal (least sure first), and "
          "how well each signal ranks the fallback's errors (AUROC)\n")
    print("| dataset | texts | fallback | LLM, pooled, on all | signal | AUROC | 10% sent | 20% | 30% |")
    print("|---|---|---:|---:|---|---:|---:|---:|---:|")
    for name in args.datasets:
        data = Replay(args.cache, name)
        pool_v, pool_y, pool_t = data.arrays["pool_vectors"], np.array(data.meta["pool_labels"]), data.meta["pool_texts"]
        cascade = data.cascade(data.fit(pool_v, list(pool_y), None, pool_t), data.policy)
        pool = ExampleStore(None, embedder_id=data.meta["embedder"], dim=pool_v.shape[1])  # searched as retrieval does
        pool.add(pool_t, list(pool_y), pool_v)
        bagged = []  # 15 fallbacks, each on 3/4 of every label's pool examples
        rng = np.random.default_rng(0)
        for _ in range(15):
            rows = np.concatenate([rng.choice(np.flatnonzero(pool_y == label), size=max(2, int(0.75 * np.sum(pool_y == label))),
                                              replace=False) for label in sorted(set(pool_y))])
            bagged.append(data.cascade(data.fit(pool_v[rows], list(pool_y[rows]), None, [pool_t[i] for i in rows]), data.policy))
        splits = {"test": (data.arrays["test_vectors"], data.meta["test_texts"], data.test_gold,
                           data.llm(cascade, data.arrays["test_llm"])),
                  "dev": (data.dev.vectors, data.dev.texts, data.dev.truth, data.dev.llm)}
        for split, (vectors, texts, gold, llm) in splits.items():
            proba = cascade.probabilities(vectors, texts)
            right = proba.argmax(axis=1) == gold
            pooled = cascade.pool(proba, llm, data.policy.llm_weight).argmax(axis=1) == gold
            top = cascade.certainty(proba)
            members = np.array([member.probabilities(vectors, texts) for member in bagged])
            agree = (members.argmax(axis=2) == proba.argmax(axis=1)).mean(axis=0)
            nearest = pool.search(vectors, 5)
            knn = (np.array([[data.index[hit.example.label] for hit in row] for row in nearest]) == proba.argmax(axis=1)[:, None]).mean(axis=1)
            signals = {"top probability (shipped)": top, "bagged fallbacks agreeing": agree + 1e-3 * top,
                       "bagged mean top probability": members.mean(axis=0).max(axis=1), "5 nearest pool labels agreeing": knn + 1e-3 * top,
                       "top probability x bagged agreement": top * agree,
                       "oracle": np.select([~right & pooled, right & ~pooled], [0.0, 2.0], 1.0) + 1e-3 * top}
            for signal, score in signals.items():
                order = np.argsort(score, kind="stable")
                cells = []
                for share in (0.1, 0.2, 0.3):
                    answered = right.copy()
                    sent = order[: int(share * len(score))]
                    answered[sent] = pooled[sent]
                    cells.append(f"{100 * answered.mean():.1f}")
                auroc = roc_auc_score(~right, -score) if (~right).any() and right.any() else float("nan")
                print(f"| {name} | {split} {len(gold)} | {100 * right.mean():.1f} | {100 * pooled.mean():.1f} | {signal} | "
                      f"{auroc:.3f} | {' | '.join(cells)} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=["collect", "replay", "summary", "routing"])
    parser.add_argument("datasets", nargs="+", help="collect, replay: one dataset; summary, routing: cache names")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--all-stream", action="store_true", help="collect: ask the LLM about every stream text")
    parser.add_argument("--orders", type=int, default=5, help="replay: stream orders (the collected one first)")
    parser.add_argument("--pool-seed", type=int, default=0, help="the gold pool's draw (bench/fallback.py's seeds)")
    parser.add_argument("--rule", action="append", choices=list(RULES), help="replay, summary: only these rules")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("LLAMA_THREADS", "2")))
    parser.add_argument("--test-size", type=int, default=300)
    parser.add_argument("--dev-size", type=int, default=200)
    parser.add_argument("--stream-size", type=int, default=2000)
    args = parser.parse_args(argv)
    args.limit = None
    if args.step in ("summary", "routing"):
        (summary if args.step == "summary" else routing)(args)
        return 0
    if len(args.datasets) != 1:
        parser.error(f"{args.step} takes one dataset")
    args.dataset = args.datasets[0]
    collect(args) if args.step == "collect" else replay(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
