"""The transformers engine on the real Gemma 3 270M checkpoint (converted from the llama.cpp engine's GGUF)."""

import json
import warnings

import numpy as np
import pytest

from labelcascade.agent.engines import EngineError, EngineTimeout, load_engine
from labelcascade.agent.engines.transformers_engine import TransformersEngine
from labelcascade.prompts import PromptRenderer
from labelcascade.records import Example
from labelcascade.task import Task

from ...conftest import DATA, EXAMPLES, few_shot
from .conftest import assert_log_probabilities

BANKING = Task.from_yaml(EXAMPLES / "banking" / "task.yaml")
SHOTS = [Example(1, "where is my new card?", ("card_arrival",)), Example(2, "please close my account", ("terminate_account",))]


def banking77() -> Task:
    """All 77 labels: with 8 examples the prompt is longer than Gemma 3's 512-token sliding window."""
    meta = json.loads((DATA / "banking77" / "labels.json").read_text(encoding="utf-8"))
    descriptions = meta.get("descriptions") or {}
    return Task.build({"name": "banking77", "labels": [{"name": n, "description": descriptions.get(n, "")} for n in meta["labels"]]})


def from_scratch(engine: TransformersEngine, prompt: str, candidate: str) -> float:
    """Log-likelihood of the candidate after the prompt: one forward over prompt + candidate, no cache (logits only
    for the positions that predict the candidate's tokens, as computing all of them would only cost time)."""
    import torch

    prompt_ids, ids = engine.tokenize(prompt, bos=True), engine.tokenize(candidate, bos=False)
    with torch.inference_mode():
        output = engine._model(input_ids=torch.tensor([prompt_ids + ids]), use_cache=False, logits_to_keep=len(ids) + 1)
    logprobs = torch.log_softmax(output.logits[0].float(), dim=-1)  # rows: positions len(prompt_ids) - 1 ..
    return sum(float(logprobs[i, token]) for i, token in enumerate(ids))


def test_scores_equal_a_forward_from_scratch(transformers_engine):
    """Every candidate scored, multi-token labels included, and each equal to a from-scratch log-likelihood: prefix
    reuse (the second prompt shares the first's static part) and the batched candidates change nothing."""
    engine = transformers_engine
    renderer = PromptRenderer(BANKING)
    candidates = renderer.candidates(BANKING.label_names)
    assert max(len(engine.tokenize(c, bos=False)) for c in candidates) >= 6
    for text in ("my card still hasn't come", "I want to close my account"):
        prompt = renderer.render(text, SHOTS).text
        scores = engine.score([prompt], [candidates])[0]
        assert list(scores) == candidates
        for candidate in candidates:
            assert scores[candidate] == pytest.approx(from_scratch(engine, prompt, candidate), abs=1e-3)


def test_prompts_longer_than_the_sliding_window_stay_exact(transformers_engine):
    """77 labels and 8 examples: ~850 tokens, evaluated in two steps, the second prompt reusing ~600 cached tokens.
    A sliding-window cache could not be cut back to a shared prefix; this engine's full cache with windowed masks is
    checked against a forward from scratch on a sample of candidates (all 77 would take minutes)."""
    engine = transformers_engine
    task = banking77()
    renderer = PromptRenderer(task)
    candidates = renderer.candidates(task.label_names)
    texts, labels = few_shot("banking77", 1)
    shots = [Example(i, text, (label,)) for i, (text, label) in enumerate(zip(texts, labels, strict=True))]
    by_length = sorted(candidates, key=lambda c: len(engine.tokenize(c, bos=False)))
    for text, examples in (("my card still hasn't come", shots[:8]), ("how do I top up by cheque?", shots[8:16])):
        prompt = renderer.render(text, examples).text
        assert len(engine.tokenize(prompt, bos=True)) > 800
        scores = engine.score([prompt], [candidates])[0]
        assert set(scores) == set(candidates)
        sample = {by_length[0], by_length[-1], max(scores, key=scores.get)}
        for candidate in sample:
            assert scores[candidate] == pytest.approx(from_scratch(engine, prompt, candidate), abs=1e-3)


def test_the_static_prefix_is_computed_once(transformers_engine):
    engine = transformers_engine
    renderer = PromptRenderer(BANKING)
    candidates = renderer.candidates(BANKING.label_names)
    first, second = (renderer.render(text, SHOTS).text for text in ("lost my card", "what is the exchange rate?"))
    engine.score([first], [candidates])
    before = engine.stats.computed_tokens
    engine.score([second], [candidates])
    computed = engine.stats.computed_tokens - before
    encoded = [engine.tokenize(c, bos=False) for c in candidates]
    batch = len(candidates) * (max(map(len, encoded)) - 1)  # every candidate but its last token, padded
    static = len(engine.tokenize(renderer.static, bos=True))
    suffix = len(engine.tokenize(second, bos=True)) - static
    assert static > 150
    assert computed - batch <= suffix + 1  # the prompt part: what follows the static part (+1 at the boundary)


def test_batches_and_log_probabilities(transformers_engine):
    renderer = PromptRenderer(BANKING)
    prompt = renderer.render("new pin please", SHOTS).text
    candidates = renderer.candidates(BANKING.label_names)
    transformers_engine._reset()  # nothing cached: the prompt and the candidates both run a forward pass
    with warnings.catch_warnings(record=True) as seen:  # the cache goes by the keyword this transformers takes
        warnings.simplefilter("always")
        alone = transformers_engine.score([prompt], [candidates])[0]
    assert not [w for w in seen if "deprecated" in str(w.message)], [str(w.message) for w in seen]
    batch = transformers_engine.score([prompt, "The capital of France is", prompt], [candidates, [" Paris", " a city"], candidates])
    assert batch[0] == pytest.approx(alone, abs=1e-4) and batch[2] == pytest.approx(alone, abs=1e-4)
    assert batch[1][" Paris"] > batch[1][" a city"]
    assert_log_probabilities(batch[0], candidates)


def test_timeout_raises_and_leaves_the_engine_usable(transformers_engine):
    renderer = PromptRenderer(BANKING)
    candidates = renderer.candidates(BANKING.label_names)
    known = renderer.render("card declined at the shop", SHOTS).text
    before = transformers_engine.score([known], [candidates])[0]
    with pytest.raises(EngineTimeout):
        transformers_engine.score([renderer.render("a brand new text " * 30).text], [candidates], timeout=0)
    after = transformers_engine.score([known], [candidates])[0]
    assert after == pytest.approx(before, abs=1e-4)
    assert all(np.isfinite(v) and v < 0 for v in after.values())


def test_a_gemma_tokenizer_without_bos_is_refused(hf_model, tmp_path):
    """The GGUF's own tokenizer adds no <bos> (tools/convert_gguf_to_hf.py repairs it); refused before loading."""
    for name in ("config.json", "tokenizer_config.json", "model.safetensors"):
        (tmp_path / name).symlink_to(hf_model / name)
    tokenizer = json.loads((hf_model / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer["post_processor"] = None
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer), encoding="utf-8")
    with pytest.raises(EngineError, match="does not prepend <bos>"):
        TransformersEngine(tmp_path)


def test_specs_and_malformed_input(transformers_engine, tmp_path):
    assert transformers_engine.spec.startswith("transformers:") and transformers_engine.spec.endswith("gemma3-270m-bf16")
    with pytest.raises(ValueError, match=r"'transformers:/path/to/hf-model\[#DTYPE\]'"):
        load_engine("transformers:")
    with pytest.raises(ValueError, match="names dtype 'bfloat16', and dtype='float16' was passed too"):
        load_engine(f"{transformers_engine.spec}#bfloat16", dtype="float16")
    with pytest.raises(EngineError, match="no Hugging Face checkpoint"):
        load_engine(f"transformers:{tmp_path / 'absent'}")
    import torch

    # By default the GPU when torch sees one (bench/gpu_llm.py saw `cuda` chosen on a GPU machine), else the CPU.
    assert transformers_engine._device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():  # checked before anything is loaded
        with pytest.raises(EngineError, match="no CUDA GPU"):
            load_engine(transformers_engine.spec, device="cuda")
    with pytest.raises(ValueError, match="duplicate candidates"):
        transformers_engine.score(["p"], [[" a\n", " a\n"]])


def test_the_spec_names_the_dtype_and_loads_it_again(hf_model):
    """`#bfloat16` in the spec picks the dtype, and the engine's spec keeps it: a workspace reopened or a Ray worker
    loads the engine from its spec, and must get the same scores (float32, the default, is left out)."""
    import torch

    engine = load_engine(f"transformers:{hf_model}#bfloat16")
    try:
        assert engine._model.dtype == torch.bfloat16 and engine.spec == f"transformers:{hf_model}#bfloat16"
        again = load_engine(engine.spec)
        assert again._model.dtype == torch.bfloat16 and again.spec == engine.spec
        prompt, candidates = "The capital of France is", [" Paris", " a city"]
        assert again.score([prompt], [candidates]) == engine.score([prompt], [candidates])
        again.close()
    finally:
        engine.close()
    with pytest.raises(EngineError, match="unknown torch dtype 'bfloat17'"):
        load_engine(f"transformers:{hf_model}#bfloat17")


@pytest.fixture(scope="module")
def batching_engine(hf_model):
    """The engine with the prompts of a call evaluated as one batch after their shared prefix (the default on a GPU
    only), in steps of 256 tokens so that long prompts take several."""
    engine = TransformersEngine(hf_model, batch_texts=True, n_batch=256)
    yield engine
    engine.close()


def test_prompts_batched_score_as_one_at_a_time(batching_engine, transformers_engine):
    """Prompts of different lengths sharing the static part, a prompt twice, one sharing only <bos>, and 77 labels
    with 8 examples (~850 tokens, past Gemma 3's 512-token sliding window, the batch in several steps): every
    candidate's log-probability as the engine gives it one prompt at a time, which the tests above check against a
    forward from scratch."""
    renderer = PromptRenderer(BANKING)
    candidates = renderer.candidates(BANKING.label_names)
    short = [renderer.render(text, SHOTS).text for text in ("lost card", "I was charged twice for one coffee this morning", "lost card")]
    task = banking77()
    long_renderer = PromptRenderer(task)
    texts, labels = few_shot("banking77", 1)
    shots = [Example(i, text, (label,)) for i, (text, label) in enumerate(zip(texts, labels, strict=True))]
    long = [long_renderer.render(text, shots[:8]).text for text in ("my card still hasn't come", "how do I top up by cheque?")]
    long_candidates = long_renderer.candidates(task.label_names)
    cases = [(short, [candidates] * 3), (short[:1] + ["The capital of France is"], [candidates, [" Paris", " a city"]]),
             (long, [long_candidates] * 2)]
    for prompts, options in cases:
        before = batching_engine.stats.computed_tokens
        batched = batching_engine.score(prompts, options)
        one_at_a_time = [transformers_engine.score([p], [o])[0] for p, o in zip(prompts, options, strict=True)]
        for got, expected in zip(batched, one_at_a_time, strict=True):
            assert list(got) == list(expected)
            assert got == pytest.approx(expected, abs=1e-3)
        assert batching_engine.stats.computed_tokens > before
    assert batched[0] != pytest.approx(batched[1], abs=1e-3)  # the two long prompts' own scores, not one row's twice


def test_a_batch_that_times_out_leaves_the_engine_usable(batching_engine):
    renderer = PromptRenderer(BANKING)
    candidates = renderer.candidates(BANKING.label_names)
    prompts = [renderer.render(text, SHOTS).text for text in ("card declined at the shop", "where is my refund")]
    before = batching_engine.score(prompts, [candidates] * 2)
    with pytest.raises(EngineTimeout):
        batching_engine.score([renderer.render("a brand new text " * 30).text, prompts[0]], [candidates] * 2, timeout=0)
    assert batching_engine.score(prompts, [candidates] * 2) == [pytest.approx(s, abs=1e-4) for s in before]


def test_batching_is_off_on_the_cpu_by_default(transformers_engine):
    assert transformers_engine._batch_texts is False
