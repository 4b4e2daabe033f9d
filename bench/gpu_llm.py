#!/usr/bin/env python
"""What one GPU LLM worker costs per text: the labelling job's own LLM prompts scored on a GPU, for the scaling
model of a job on Ray Data (issue 18), beside the embedded llama.cpp engine on this machine's CPU.

    .venv/bin/python bench/gpu_llm.py prepare            # here: the job's prompts (+ llama.cpp on them, ~2 min)
    python3 bench/gpu_llm.py measure --folder .gpu --out OUT/gpu_llm.json    # on the GPU machine
    .venv/bin/python bench/gpu_llm.py --markdown-only    # the BENCHMARKS section from bench/results/gpu_llm.json
    .venv/bin/python bench/gpu_llm.py cpu                # here: llama.cpp vs transformers on these prompts (~12 min)

`prepare` builds bench/job.py's workspace (ag_news, 8 gold examples per class, seed 0) with the policy that job's
calibration chose (bench/results/job_ray_llm.json: its retrieved examples, candidates and batch), takes the first
--texts of the job's rows that the fallback is unsure of (those the job sends to the LLM), and records the exact
prompts and candidates the cascade asks the engine for. It times the embedded llama.cpp engine (Gemma 3 270M GGUF,
2 threads) on them, the job's CPU LLM worker, and writes the prompts, that result and Gemma 3 270M's config and
tokenizer (from the Hugging Face checkpoint `tools/vllm_server.sh setup` converts) into --folder.

`measure` runs where a GPU is and needs only torch and transformers (no other dependency of this package: the
engine's two modules are imported alone). The weights cannot reach such a machine (it fetches nothing, and a call
carries at most 64 MiB; the checkpoint is 536 MB), so it builds Gemma 3 270M from its config with random weights:
the same shapes, so the same work per token; the scores are meaningless and no accuracy is measured. It checks that
the engine's scores on the GPU equal a forward pass from scratch (prompts past Gemma 3's 512-token sliding window
included), then times the transformers engine on the GPU as the job's LLM stage calls it (batches of the policy's
llm_batch, the device chosen by the engine's default), in bfloat16 and float32; and, as a bound for an engine that
batches texts (vLLM), one forward pass over a batch of whole prompts (left-padded; first-token distributions only).

`cpu` compares the engines on this CPU with the real weights, on the same prompts (bench/results/cpu_engines.json).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

# bench/common.py needs only the standard library, so the GPU machine imports it too (the script folder is on the path)
from common import DEFAULT_DATA, HF_CHECKPOINT, MARKDOWN, log, write_markdown_section

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
DEFAULT_FOLDER = REPO / ".gpu"  # in .gitignore: what `prepare` writes for the GPU machine
DEFAULT_OUT = BENCH / "results" / "gpu_llm.json"
HEADING = "## One GPU LLM worker: the job's prompts on a GPU (bench/gpu_llm.py)"
CPU_HEADING = "## The job's LLM prompts on this CPU: llama.cpp vs transformers (bench/gpu_llm.py cpu)"
CPU_OUT = BENCH / "results" / "cpu_engines.json"
CARRIED = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json")
JOB_RESULT = BENCH / "results" / "job_ray_llm.json"  # the policy its calibration chose
WARM_UP, BOUND_BATCHES, CHECKED, LONG_CHECKED, PASSES = 16, (1, 8, 32, 128), 8, 2, (1, 2)
CHECKED_CALLS = 3  # engine calls (of the job's batch of prompts) checked batched against one prompt at a time


def prepare(args: argparse.Namespace) -> int:
    """Here, on the CPU: the job's LLM prompts, the llama.cpp engine timed on them, config and tokenizer."""
    from job import DATASET, prepare as job_rows

    from labelcascade import Session, Task

    checkpoint, load_start = args.checkpoint, round(os.getloadavg()[0], 1)
    if not (checkpoint / "config.json").is_file():
        raise SystemExit(f"{checkpoint}: no Hugging Face checkpoint; run `tools/vllm_server.sh setup` first")
    policy = json.loads(JOB_RESULT.read_text(encoding="utf-8"))["policy"]
    pool, _, rows = job_rows(DEFAULT_DATA, args.rows)
    labels = json.loads((DEFAULT_DATA / DATASET / "labels.json").read_text(encoding="utf-8"))["labels"]
    args.folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="labelcascade-gpu-") as workspace:
        session = Session.create(Task.from_labels(labels, name=DATASET), workspace=workspace)
        session.add_examples([row["text"] for row in pool], [row["label"] for row in pool], retrain=True)
        session.set_policy(type(session.policy).model_validate(policy))
        unsure = session.unsure([row["text"] for row in rows])
        asked_rows = [row for row, asked in zip(rows, unsure, strict=True) if asked][: args.texts]
        texts = [row["text"] for row in asked_rows]
        if len(texts) < args.texts:
            raise SystemExit(f"only {len(texts)} of the first {args.rows} rows go to the LLM; raise --rows")
        cascade = session.cascade
        engine = cascade.engine.get()
        asked: list[tuple[list[str], list[list[str]]]] = []

        def record(prompts, candidates, **_):  # the cascade's request, recorded instead of scored
            asked.append((list(prompts), [list(c) for c in candidates]))
            return [dict.fromkeys(c, 0.0) for c in candidates]

        engine.score = record
        vectors = cascade.embedder.embed(texts)
        batch = policy["llm_batch"]
        for start in range(0, len(texts), batch):  # as the job's LLM stage asks: one engine call per batch
            chunk = slice(start, start + batch)
            cascade.llm_scores(texts[chunk], cascade.probabilities(vectors[chunk], texts[chunk]), cascade.neighbors(vectors[chunk]))
        del engine.score  # the real method again
        log(f"recorded {len(asked)} engine calls for {len(texts)} texts; timing llama.cpp on them")
        cpu, _ = time_engine(engine, asked, warm_up=warm_up_calls(batch))
        session.close()
    (args.folder / "prompts.json").write_text(json.dumps({
        "dataset": DATASET, "policy": policy, "texts": len(texts), "calls": asked,
        "gold": [row["label"] for row in asked_rows]}), encoding="utf-8")  # the job reads texts only; for `cpu`
    (args.folder / "cpu.json").write_text(json.dumps({
        "date": dt.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "load_start": load_start, "load_end": round(os.getloadavg()[0], 1), "engine": engine.spec, **cpu}, indent=1),
        encoding="utf-8")
    (args.folder / "model").mkdir(exist_ok=True)
    copy_carried(checkpoint, args.folder / "model")
    log(f"llama.cpp on this CPU: {cpu['seconds_per_text']:.3f} s per text; wrote {args.folder}")
    return 0


def warm_up_calls(llm_batch: int) -> int:
    """Engine calls left untimed before timing: WARM_UP texts' worth, at least one."""
    return max(1, WARM_UP // llm_batch)


def time_engine(engine, calls: list, warm_up: int) -> tuple[dict, list[str]]:
    """Seconds per text over `calls` (after `warm_up` untimed calls), one engine.score per call as the job makes
    them, and the engine's token counts per text; and the label each timed text got (its best candidate)."""
    for prompts, candidates in calls[:warm_up]:
        engine.score(prompts, candidates)
    before, seconds, per_call, answers = vars(engine.stats).copy(), 0.0, [], []
    timed = calls[warm_up:]
    for prompts, candidates in timed:
        began = time.perf_counter()
        scores = engine.score(prompts, candidates)
        elapsed = time.perf_counter() - began
        seconds += elapsed
        per_call.append(elapsed / len(prompts))
        answers += [max(row, key=row.get).strip() for row in scores]
    texts = len(answers)
    delta = {key: getattr(engine.stats, key) - before[key] for key in before}
    return {"texts": texts, "seconds": seconds, "seconds_per_text": seconds / texts, "texts_per_s": texts / seconds,
            "median_call_seconds_per_text": statistics.median(per_call),
            "prompt_tokens_per_text": delta["prompt_tokens"] / texts,
            "computed_tokens_per_text": delta["computed_tokens"] / texts}, answers


def import_engine_alone():
    """The transformers engine without the package's other dependencies (FAISS, llama.cpp, pydantic, ...), which a
    bare GPU machine lacks: its parent packages stand in as empty namespaces, so only base.py and the engine load."""
    src = REPO / "src"
    for name in ("labelcascade", "labelcascade.agent", "labelcascade.agent.engines"):
        module = types.ModuleType(name)
        module.__path__ = [str(src / name.replace(".", "/"))]
        sys.modules[name] = module
    from labelcascade.agent.engines.transformers_engine import TransformersEngine

    return TransformersEngine


def random_checkpoint(model_folder: Path, into: Path, torch) -> Path:
    """Gemma 3 270M's architecture with random weights (seed 0), saved as safetensors beside its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_folder)).to(torch.bfloat16)
    model.save_pretrained(into, safe_serialization=True)  # its own config.json
    copy_carried(model_folder, into, but=("config.json",))
    return into


def copy_carried(source: Path, into: Path, but: tuple[str, ...] = ()) -> None:
    """The CARRIED files `source` has (config and tokenizer), but `but`, into `into`."""
    for name in CARRIED:
        if name not in but and (source / name).is_file():
            (into / name).write_bytes((source / name).read_bytes())


def from_scratch(model, engine, prompt: str, options: list[str], torch) -> dict[str, float]:
    """Each candidate's log-probability from one forward pass over prompt + candidate, no cache."""
    prompt_ids = engine.tokenize(prompt, bos=True)
    scores = {}
    for option in options:
        ids = list(engine.candidate_ids(option))
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([prompt_ids + ids], device=model.device)).logits[0].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        scores[option] = sum(logprobs[len(prompt_ids) - 1 + k, token].item() for k, token in enumerate(ids))
    return scores


def batched_bound(model, tokenizer, prompts: list[str], batch: int, torch) -> dict:
    """Texts/s of one forward pass over `batch` whole prompts at a time (left-padded, first-token distribution only):
    what an engine that batches texts could reach, before the candidates' later tokens."""
    tokenizer.padding_side = "left"
    seconds, texts, tokens = 0.0, 0, 0
    for warm in (True, False):
        for start in range(0, len(prompts) if not warm else batch, batch):
            chunk = prompts[start : start + batch]
            encoded = tokenizer(chunk, return_tensors="pt", padding=True).to(model.device)
            synchronize(torch)
            began = time.perf_counter()
            with torch.inference_mode():
                logits = model(**encoded, logits_to_keep=1).logits
                torch.log_softmax(logits.float(), dim=-1)
            synchronize(torch)
            if not warm:
                seconds += time.perf_counter() - began
                texts += len(chunk)
                tokens += int(encoded["attention_mask"].sum())
    return {"batch": batch, "texts": texts, "seconds": seconds, "texts_per_s": texts / seconds,
            "prompt_tokens_per_s": tokens / seconds}


def synchronize(torch) -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(args: argparse.Namespace) -> int:
    """On the GPU machine: correctness, the engine timed in two dtypes, the batched bound (on a CPU too, slowly:
    a dry run of the script with --calls)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    TransformersEngine = import_engine_alone()
    recorded = json.loads((args.folder / "prompts.json").read_text(encoding="utf-8"))
    calls = recorded["calls"][: args.calls]
    gpu = torch.cuda.is_available()
    result = {"date": dt.date.today().isoformat(), "gpu": torch.cuda.get_device_name(0) if gpu else "CPU (dry run)",
              "torch": torch.__version__, "transformers": transformers.__version__,
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "texts": recorded["texts"],
              "dataset": recorded["dataset"], "llm_batch": recorded["policy"]["llm_batch"],
              "cpu": json.loads((args.folder / "cpu.json").read_text(encoding="utf-8"))}
    with tempfile.TemporaryDirectory(prefix="gemma-random-") as folder:
        path = random_checkpoint(args.folder / "model", Path(folder), torch)

        engine = TransformersEngine(path, dtype="float32")  # the default device: the GPU when torch sees one
        result["default_device"] = str(engine._device)
        reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(engine._device).eval()
        prompts = [p for call in calls for p in call[0]]
        options = [o for call in calls for o in call[1]]
        checked = [(prompts[i], options[i]) for i in range(CHECKED)]
        checked += [("\n\n".join(prompts[i : i + 3]), options[i]) for i in range(0, 3 * LONG_CHECKED, 3)]
        worst, lengths = 0.0, []
        for prompt, option in checked:
            got = engine.score([prompt], [option])[0]
            want = from_scratch(reference, engine, prompt, option, torch)
            worst = max(worst, max(abs(got[o] - want[o]) for o in option))
            lengths.append(len(engine.tokenize(prompt, bos=True)))
        result["check"] = {"prompts": len(checked), "prompt_tokens": lengths, "max_abs_difference": worst}
        print(f"check: {len(checked)} prompts ({min(lengths)}-{max(lengths)} tokens), max |engine - scratch| = "
              f"{worst:.2e}", flush=True)
        del reference
        # the prompts of a call batched (batch_texts) against the same engine one prompt at a time, first calls
        batching = TransformersEngine(path, dtype="float32", batch_texts=True)
        batch_worst = 0.0
        for call_prompts, call_options in calls[:CHECKED_CALLS]:
            together = batching.score(call_prompts, call_options)
            alone = [engine.score([p], [o])[0] for p, o in zip(call_prompts, call_options, strict=True)]
            batch_worst = max(batch_worst, max(abs(a[o] - b[o]) for a, b in zip(together, alone, strict=True) for o in a))
        batching.close()
        result["check"]["batched_max_abs_difference"] = batch_worst
        print(f"check: prompts batched vs one at a time, {CHECKED_CALLS} calls, max difference {batch_worst:.2e}", flush=True)

        device = engine._device
        result["engine"] = []
        for dtype, batched in (("float32", False), ("float32", True), ("bfloat16", False), ("bfloat16", True)):
            if (dtype, batched) != ("float32", False):  # float32 one at a time first: the engine the check used
                engine.close()
                engine = TransformersEngine(path, dtype=dtype, batch_texts=batched)
            if gpu:
                torch.cuda.reset_peak_memory_stats()
            for run in PASSES:  # the same calls twice: the first run over them was seen to be the slower
                timed, _ = time_engine(engine, calls, warm_up=warm_up_calls(result["llm_batch"]))
                timed.update(dtype=dtype, batched=batched, run=run,
                             peak_gpu_mib=torch.cuda.max_memory_allocated() / 2**20 if gpu else 0.0)
                result["engine"].append(timed)
                print(f"transformers engine, {dtype}{', prompts batched' if batched else ''}, run {run}: "
                      f"{timed['seconds_per_text'] * 1000:.1f} ms per text, {timed['texts_per_s']:.1f} texts/s", flush=True)
        engine.close()

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        result["batched_bound"] = []
        for batch in BOUND_BATCHES if gpu else BOUND_BATCHES[:2]:
            bound = batched_bound(model, tokenizer, prompts, batch, torch)
            result["batched_bound"].append(bound)
            print(f"batched forward, bfloat16, batch {batch}: {bound['texts_per_s']:.0f} texts/s", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


def cpu_engines(args: argparse.Namespace) -> int:
    """Here: the recorded prompts on this CPU, the embedded llama.cpp engine against the transformers engine on the
    real Gemma 3 270M checkpoint in float32 and bfloat16, 2 threads each; each engine twice, in turn and then in
    reverse order (the machine is shared), with accuracy against the texts' gold labels and agreement."""
    from labelcascade.agent.engines import load_engine

    recorded = json.loads((args.folder / "prompts.json").read_text(encoding="utf-8"))
    if "gold" not in recorded:
        raise SystemExit(f"{args.folder / 'prompts.json'} has no gold labels: run `prepare` again")
    calls = recorded["calls"][: args.calls]
    checkpoint = str(args.checkpoint)
    specs = {"llama.cpp (Q4_K_M GGUF)": ("llamacpp:default", {"n_threads": 2}),
             "transformers, float32": (f"transformers:{checkpoint}", {"dtype": "float32", "n_threads": 2}),
             "transformers, bfloat16": (f"transformers:{checkpoint}", {"dtype": "bfloat16", "n_threads": 2}),
             "transformers, bfloat16, prompts batched": (f"transformers:{checkpoint}",
                                                         {"dtype": "bfloat16", "n_threads": 2, "batch_texts": True})}
    warm_up = warm_up_calls(recorded["policy"]["llm_batch"])
    warm_up_texts = sum(len(prompts) for prompts, _ in calls[:warm_up])
    texts = sum(len(prompts) for prompts, _ in calls) - warm_up_texts
    gold = recorded["gold"][warm_up_texts:][:texts]
    result = {"date": dt.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "load_start": round(os.getloadavg()[0], 1), "dataset": recorded["dataset"], "texts": texts,
              "warm_up_texts": warm_up_texts, "cpu_flags": bf16_flags(), "engines": {}}
    answers: dict[str, list[str]] = {}
    for name in [*specs, *reversed(specs)]:
        spec, options = specs[name]
        engine = load_engine(spec, **options)
        timed, got = time_engine(engine, calls, warm_up)
        engine.close()
        answers.setdefault(name, got)
        row = result["engines"].setdefault(name, {"spec": spec, "options": options, "seconds_per_text": []})
        row["seconds_per_text"].append(timed["seconds_per_text"])
        row["accuracy"] = sum(a == b for a, b in zip(got, gold, strict=True)) / texts
        log(f"{name}: {1000 * timed['seconds_per_text']:.0f} ms per text, accuracy {100 * row['accuracy']:.1f}%")
    reference = next(iter(specs))
    for name, row in result["engines"].items():
        row["agreement_with_llamacpp"] = sum(a == b for a, b in zip(answers[name], answers[reference])) / texts
    result["load_end"] = round(os.getloadavg()[0], 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    if args.no_markdown:
        print(cpu_markdown(result))
    else:
        write_markdown_section(MARKDOWN, CPU_HEADING, cpu_markdown(result))
    return 0


def bf16_flags() -> str:
    """The CPU's bfloat16 instructions, which torch's bfloat16 matrix products use and this llama.cpp build does not
    (built without AMX: see the Makefile)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text(encoding="utf-8").split())
    except OSError:
        return ""
    return ", ".join(sorted(flags & {"avx512_bf16", "amx_bf16"})) or "no bfloat16 instructions"


def cpu_markdown(result: dict) -> str:
    """The BENCHMARKS section of the `cpu` step."""
    lines = [
        CPU_HEADING, "",
        f"Measured {result['date']} on {result['machine']} (1-min load {result['load_start']} at the start, "
        f"{result['load_end']} at the end). The {result['texts']} texts after {result['warm_up_texts']} of warm-up from "
        f"the prompts `prepare` recorded (bench/job.py's {result['dataset']} texts that its calibrated policy sends to "
        "the LLM: the hard ones), each engine on the real Gemma 3 270M with 2 threads, twice: all in turn, then in "
        "reverse order. Accuracy against the texts' gold labels; agreement = the same label as llama.cpp's.",
        "",
        "| engine | ms per text (both runs) | accuracy % | agreement with llama.cpp % |",
        "|---|---|---:|---:|",
    ]
    for name, row in result["engines"].items():
        runs = " / ".join(f"{1000 * s:.0f}" for s in row["seconds_per_text"])
        lines.append(f"| {name} | {runs} | {100 * row['accuracy']:.1f} | {100 * row['agreement_with_llamacpp']:.1f} |")
    mean = {name: statistics.mean(row["seconds_per_text"]) for name, row in result["engines"].items()}
    llamacpp, best = next(iter(mean)), min(mean, key=mean.get)
    if best != llamacpp:
        lines += ["", f"Read: {best} took {mean[best] / mean[llamacpp]:.2f} of llama.cpp's time per text (mean of the "
                  "two runs) on this CPU" + (f" ({result['cpu_flags']})" if result.get("cpu_flags") else "") + "."]
    lines.append("")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    """The BENCHMARKS section, from the JSON `measure` wrote."""
    cpu, gpu = result["cpu"], result["engine"]
    check = result["check"]
    lines = [
        HEADING, "",
        f"Measured {result['date']} on one {result['gpu']} ({result['machine']}; torch {result['torch']}, transformers "
        f"{result['transformers']}) and, for the CPU row, on this machine ({cpu['machine']}, 1-min load {cpu['load_start']} at the start, "
        f"{cpu['load_end']} at the end) on "
        f"{cpu['date']}. The same {result['texts']} texts: the first of "
        f"bench/job.py's {result['dataset']} rows that its calibrated policy sends to the LLM (8 retrieved examples, "
        f"all labels as candidates), as the job's LLM stage asks for them: {result['llm_batch']} texts per engine call, "
        f"the first {result['texts'] - cpu['texts']} untimed (warm-up), {cpu['texts']} timed. The exact prompts the "
        "cascade builds were recorded here and carried there.",
        "",
        "On the GPU, Gemma 3 270M has random weights (built from its config: the weights cannot reach that machine), "
        "so these rows time the same shapes, not answers: no accuracy is measured there. Before timing, the engine's "
        f"scores on the GPU (float32) matched a forward pass from scratch on {check['prompts']} prompts of "
        f"{min(check['prompt_tokens'])}-{max(check['prompt_tokens'])} tokens (past the 512-token sliding window) "
        f"within {check['max_abs_difference']:.1e}; the engine chose `{result['default_device']}` by default."
        + (f" Batching the prompts of a call (`batch_texts`) moved no score by more than "
           f"{check['batched_max_abs_difference']:.1e} against one prompt at a time ({CHECKED_CALLS} calls)."
           if "batched_max_abs_difference" in check else ""),
        "",
        "| engine | device | ms per text | texts/s | prompt tok/text | computed tok/text | peak GPU MiB |",
        "|---|---|---:|---:|---:|---:|---:|",
        f"| llama.cpp (Gemma 3 270M Q4_K_M, embedded default) | CPU, 2 threads | {1000 * cpu['seconds_per_text']:.0f} | "
        f"{cpu['texts_per_s']:.2f} | {cpu['prompt_tokens_per_text']:.0f} | {cpu['computed_tokens_per_text']:.0f} | - |",
    ]
    for row in gpu:
        batched = ", prompts batched" if row.get("batched") else ""
        lines.append(f"| transformers ({row['dtype']}{batched}, run {row['run']} over the texts) | {result['gpu']} | "
                     f"{1000 * row['seconds_per_text']:.1f} | "
                     f"{row['texts_per_s']:.1f} | {row['prompt_tokens_per_text']:.0f} | "
                     f"{row['computed_tokens_per_text']:.0f} | {row['peak_gpu_mib']:.0f} |")
    alone = [row for row in gpu if not row.get("batched")]
    together = [row["seconds_per_text"] for row in gpu if row.get("batched")]
    fast, slow = min(row["seconds_per_text"] for row in alone), max(row["seconds_per_text"] for row in alone)
    bounds = ", ".join(f"batch {b['batch']}: {b['texts_per_s']:.0f}" for b in result["batched_bound"])
    lines += ["", f"Batched bound (bfloat16, one forward pass per batch of whole prompts, left-padded, first-token "
              f"distribution only; not an engine of this package), texts/s: {bounds}.", ""]
    if result.get("note"):
        lines += [f"Note on this run: {result['note']}", ""]
    lines += [
        f"Read: one GPU worker with the transformers engine scored the job's LLM texts at {1000 * fast:.0f}-"
        f"{1000 * slow:.0f} ms each, {cpu['seconds_per_text'] / slow:.0f}-{cpu['seconds_per_text'] / fast:.0f}x "
        "faster than llama.cpp on 2 CPU threads (one prompt at a time). So run, the engine evaluates one text per forward "
        "pass (the prompt, then its candidates as one batch); the batched bound shows what that leaves on the GPU: whole prompts at batch 1 run "
        f"at {result['batched_bound'][0]['texts_per_s']:.0f} texts/s, at batch {result['batched_bound'][-1]['batch']} "
        f"at {result['batched_bound'][-1]['texts_per_s']:.0f}. "
        + (f"With the prompts of each call batched (`batch_texts`, the default on a GPU since 2026-12-04) the engine "
           f"took {1000 * min(together):.0f}-{1000 * max(together):.0f} ms per text. vLLM was not measured (it cannot "
           "reach that machine: nothing is fetched there and a call carries at most 64 MiB)." if together else
           "An engine that batches texts (vLLM, or this engine batching the texts of one call) is what would use a "
           "GPU well; neither was measured here (vLLM cannot reach that machine: nothing is fetched there and a call "
           "carries at most 64 MiB)."),
        "",
    ]
    lines += scaling(fast, slow, cpu["seconds_per_text"])
    return "\n".join(lines)


def scaling(fast: float, slow: float, cpu: float) -> list[str]:
    """The job's scaling model with a measured GPU c_llm: the LLM share of bench/job.py's 10,000-row cascade on Ray
    (the job whose prompts were timed) and the fallback's cost per row from its fallback-only run."""
    llm_run, fallback_run = BENCH / "results" / "job_ray_llm.json", BENCH / "results" / "job_ray_fallback.json"
    if not (llm_run.is_file() and fallback_run.is_file()):
        return []
    on_ray = json.loads(llm_run.read_text(encoding="utf-8"))["arms"].get("cascade, ray 1")
    fallback = json.loads(fallback_run.read_text(encoding="utf-8"))["arms"].get("fallback only")
    if on_ray is None or fallback is None:
        return []
    share = (on_ray["routes"].get("llm", 0) + on_ray["routes"].get("degraded", 0)) / on_ray["rows"]
    per_row = fallback["seconds"] / fallback["rows"]
    return [
        f"In bench/job.py's scaling model (rows/s = min(W_fb / c_fb, W_llm / (s x c_llm), R_driver)), with the LLM "
        f"share of its 10,000-row cascade on Ray (s = {share:.1%}) and its fallback's cost (c_fb = {1000 * per_row:.1f} "
        f"ms per row, one process on 2 CPU cores): each such GPU worker carries {1 / (share * slow):.0f}-"
        f"{1 / (share * fast):.0f} rows/s, so the output of about {per_row / (share * slow):.1f}-"
        f"{per_row / (share * fast):.1f} fallback workers of 2 cores keeps one busy, where one llama.cpp worker on 2 CPU threads "
        f"carries {1 / (share * cpu):.0f} rows/s. This is measured per text, not as a Ray job on that machine (Ray and "
        "this package's other dependencies cannot reach it either).",
        "",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", nargs="?", choices=["prepare", "measure", "cpu"])
    parser.add_argument("--folder", type=Path, default=DEFAULT_FOLDER)
    parser.add_argument("--checkpoint", type=Path, default=HF_CHECKPOINT)
    parser.add_argument("--texts", type=int, default=200)
    parser.add_argument("--rows", type=int, default=2000, help="job rows to look through for --texts unsure ones")
    parser.add_argument("--calls", type=int, default=None, help="measure: only the first CALLS engine calls")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--markdown-only", action="store_true", help="rebuild the BENCHMARKS section from --out")
    parser.add_argument("--no-markdown", action="store_true", help="cpu: print its section, leave BENCHMARKS.md as is")
    args = parser.parse_args(argv)
    if args.step == "cpu" and args.out == DEFAULT_OUT:
        args.out = CPU_OUT
    if args.markdown_only:
        result = json.loads(args.out.read_text(encoding="utf-8"))
        heading, text = (CPU_HEADING, cpu_markdown(result)) if args.step == "cpu" else (HEADING, markdown(result))
        write_markdown_section(MARKDOWN, heading, text)
        return 0
    if args.step is None:
        parser.error("name a step (prepare, measure, cpu) or --markdown-only")
    return {"prepare": prepare, "measure": measure, "cpu": cpu_engines}[args.step](args)


if __name__ == "__main__":
    raise SystemExit(main())
