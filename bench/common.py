"""What the benchmarks share: the datasets, the seeded draws of gold examples and test texts, and the
regeneration of one section of BENCHMARKS.md. One definition, so "the same 8/class set" means the same texts."""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
HF_CHECKPOINT = REPO / ".cache" / "gemma3-270m-bf16"  # Gemma 3 270M converted by `tools/vllm_server.sh setup`
MARKDOWN = REPO / "BENCHMARKS.md"
DATASETS = ["banking77", "ag_news", "sst2", "sms_spam", "trec"]  # English
CHINESE = ["eprstmt", "csldcp"]
TRAIN_SEED_BASE = 1000  # seed s draws its gold examples with random.Random(1000 + s)
TEST_SEED = 20240607  # fixed sample of a test split larger than the size asked for
DRAW_PER_CLASS = 16  # every seed draws 16 per class; fewer shots take a prefix, so the sets nest


def llamacpp_model_title(name: str) -> str | None:
    """Which model a `llamacpp:<name>` spec runs, as the benchmarks' settings name it: the embedded default (Gemma),
    a packaged model's title, or None for a path."""
    from labelcascade.agent.engines.packaged_models import PACKAGED_MODELS

    if name in ("", "default"):
        return "Gemma 3 270M base, GGUF Q4_K_M"
    return PACKAGED_MODELS[name].title if name in PACKAGED_MODELS else None


def log(message: str) -> None:
    print(message, flush=True)


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_sample(rows: list[dict], size: int) -> list[dict]:
    """`size` rows in file order, the same for every benchmark; all of them when there are no more."""
    if len(rows) <= size:
        return rows
    return [rows[i] for i in sorted(random.Random(TEST_SEED).sample(range(len(rows)), size))]


def shuffled_test_sample(rows: list[dict], size: int) -> list[dict]:
    """`test_sample` in a seeded shuffled order, so that its first n rows are a random subset of it: banking77's and
    csldcp's test files are grouped by label, and the first n in file order cover a few labels only."""
    sample = test_sample(rows, size)
    random.Random(TEST_SEED).shuffle(sample)
    return sample


def per_class_draw(train: list[dict], seed: int, name: str, draw: int = DRAW_PER_CLASS) -> dict[str, list[int]]:
    """Indices into `train` of `draw` examples of every label (labels sorted), seeded by `seed`."""
    by_label: dict[str, list[int]] = {}
    for i, row in enumerate(train):
        by_label.setdefault(row["label"], []).append(i)
    rng = random.Random(TRAIN_SEED_BASE + seed)
    picked = {}
    for label in sorted(by_label):
        if len(by_label[label]) < draw:
            raise SystemExit(f"{name}: label {label!r} has only {len(by_label[label])} training examples, need {draw}")
        picked[label] = rng.sample(by_label[label], draw)
    return picked


def write_markdown_section(path: Path, heading: str, section: str) -> None:
    """Replace the section under `heading` (up to the next `## ` heading) with `section`, or append it."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == heading), None)
    if start is None:
        path.write_text(text.rstrip("\n") + "\n\n" + section, encoding="utf-8")
        return
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    tail = "".join(lines[end:])
    path.write_text("".join(lines[:start]) + section + ("\n" + tail if tail else ""), encoding="utf-8")


def machine_and_load() -> dict:
    """What a run was measured on, and how busy the machine was as it began (llama.cpp slows a lot under load)."""
    return {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "load_start": round(os.getloadavg()[0], 1)}


def measured_on(result: dict) -> str:
    """The opening of a gold-set benchmark's section: when, how long, on what, how busy, which seeds and test texts."""
    s = result["settings"]
    return (f"Measured {result['date']} in {result['run_seconds']:.0f} s on {s['machine']} (1-min load {s['load_start']} "
            f"at the start), seeds {s['seeds']}, {s['test_size']} test texts per dataset (fewer where the test split is "
            "smaller)")


def output_arguments(parser: argparse.ArgumentParser, default_out: Path, document: Path = MARKDOWN) -> None:
    """The options the benchmarks share: where the datasets are, where the run's JSON goes, and what happens to its
    section of `document` (--no-markdown: left alone; --markdown-only: rebuilt from --out, nothing measured)."""
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=default_out)
    parser.add_argument("--no-markdown", action="store_true")
    parser.add_argument("--markdown-only", action="store_true", help=f"only rebuild the {document.name} section from --out")


def rebuilt_section_only(args: argparse.Namespace, heading: str, markdown: Callable[[dict], str],
                         document: Path = MARKDOWN) -> bool:
    """With --markdown-only: rebuild the section from the JSON in --out and say so (the caller stops there)."""
    if args.markdown_only:
        write_markdown_section(document, heading, markdown(json.loads(args.out.read_text(encoding="utf-8"))))
    return args.markdown_only


def publish(result: dict, out: Path, section: str, *, markdown: Path | None, heading: str) -> None:
    """Write the run's JSON to `out`, print its section, and (unless `markdown` is None) regenerate that section."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    log(section)
    if markdown is not None:
        write_markdown_section(markdown, heading, section)
