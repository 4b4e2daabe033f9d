"""The embedded default engine on the real Gemma 3 270M GGUF through llama.cpp."""

import numpy as np
import pytest

from labelcascade.agent.engines import EngineTimeout, load_engine, normalize
from labelcascade.agent.engines.llamacpp import LlamaCppEngine, default_model_path
from labelcascade.prompts import PromptRenderer
from labelcascade.records import Example
from labelcascade.task import Task

from ...conftest import EXAMPLES, few_shot

BANKING = Task.from_yaml(EXAMPLES / "banking" / "task.yaml")


@pytest.fixture(scope="module")
def engine():
    engine = load_engine("llamacpp:default")
    yield engine
    engine.close()


def brute_force(n_batch: int):
    """Log-likelihood of a continuation from scratch: llama-cpp-python's own evaluation, logits for every token."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(default_model_path()), n_ctx=1024, n_batch=n_batch, n_ubatch=n_batch,
                logits_all=True, verbose=False)

    def log_likelihood(prompt: str, continuation: str) -> float:
        prompt_tokens = llm.tokenize(prompt.encode(), add_bos=True, special=True)
        tokens = llm.tokenize(continuation.encode(), add_bos=False, special=False)
        llm.reset()
        llm.eval(prompt_tokens + tokens)
        total = 0.0
        for i, token in enumerate(tokens):
            logits = llm.scores[len(prompt_tokens) + i - 1].astype(np.float64)
            total += logits[token] - (logits.max() + np.log(np.exp(logits - logits.max()).sum()))
        return total

    return llm, log_likelihood


def banking_prompts(n: int) -> list[str]:
    renderer = PromptRenderer(BANKING)
    texts, labels = few_shot("banking77", 1)
    shots = [Example(i, text, (label,)) for i, (text, label) in enumerate(zip(texts, labels, strict=True))
             if label in BANKING.label_names]
    return [renderer.render(text, shots[:3]).text for text in ("my card still hasn't come", "I want to close my account")[:n]]


def test_scoring_is_exact_with_sequential_evaluation():
    """Prefix reuse, the candidate trie and the sort order change nothing: one token per step, the engine's scores
    equal a from-scratch log-likelihood of each candidate alone (multi-token labels included)."""
    engine = LlamaCppEngine(n_batch=1)
    llm, log_likelihood = brute_force(n_batch=1)
    renderer = PromptRenderer(BANKING)
    candidates = renderer.candidates(BANKING.label_names)
    assert max(len(engine.tokenize(c, bos=False)) for c in candidates) >= 6  # multi-token labels are in the test
    shots = [Example(1, "card not here yet", ("card_arrival",))]
    prompts = [f"Label the message.\nText: {text}\nLabel:" for text in ("my card is late", "close my account")]
    prompts.append(renderer.render("new pin please", shots).dynamic)  # examples, then the text
    try:
        for prompt in prompts:  # later prompts reuse the cached start of earlier ones
            scores = engine.score([prompt], [candidates])[0]
            assert list(scores) == candidates
            for candidate in candidates:
                assert scores[candidate] == pytest.approx(log_likelihood(prompt, candidate), abs=1e-3)
    finally:
        engine.close()
        llm.close()


def test_batched_scores_stay_within_kernel_rounding(engine):
    """Batched evaluation rounds differently with batch shape (llama.cpp's CPU kernels); the answers agree."""
    llm, log_likelihood = brute_force(n_batch=512)
    renderer = PromptRenderer(BANKING)
    candidates = renderer.candidates(BANKING.label_names)
    try:
        for prompt in banking_prompts(2):
            scores = engine.score([prompt], [candidates])[0]
            reference = {candidate: log_likelihood(prompt, candidate) for candidate in candidates}
            assert max(abs(scores[c] - reference[c]) for c in candidates) < 0.25
            assert max(scores, key=scores.get) == max(reference, key=reference.get)
    finally:
        llm.close()


def test_probabilities_cover_every_candidate_and_sum_to_one(engine):
    renderer = PromptRenderer(BANKING)
    prompts = banking_prompts(2)
    candidates = [renderer.candidates(BANKING.label_names)] * 2
    for scores in engine.score(prompts, candidates):
        probabilities = normalize(scores)
        assert set(probabilities) == set(candidates[0])
        assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-9)
        assert all(0 <= p <= 1 for p in probabilities.values())


def test_the_static_prefix_is_computed_once(engine):
    renderer = PromptRenderer(BANKING)
    candidates = renderer.candidates(BANKING.label_names)
    first, second = banking_prompts(2)
    engine.score([first], [candidates])
    before = engine.stats.computed_tokens
    engine.score([second], [candidates])
    computed = engine.stats.computed_tokens - before
    static = len(engine.tokenize(renderer.static, bos=True))
    suffix = len(engine.tokenize(second, bos=True)) - static
    label_tokens = sum(len(engine.tokenize(c, bos=False)) for c in candidates)
    assert static > 200  # the label list is long, so what is reused matters
    assert computed <= 1.2 * (suffix + label_tokens)


def test_identical_prompt_twice_gives_identical_scores(engine):
    prompt = banking_prompts(1)[0]
    candidates = [" yes\n", " no\n"]
    assert engine.score([prompt, prompt], [candidates, candidates])[0] == pytest.approx(
        engine.score([prompt], [candidates])[0], abs=1e-4)


def test_timeout_raises_and_leaves_the_engine_usable(engine):
    renderer = PromptRenderer(BANKING)
    prompt = renderer.render("a brand new text that is not cached " * 20).text
    with pytest.raises(EngineTimeout):
        engine.score([prompt], [renderer.candidates(BANKING.label_names)], timeout=0)
    scores = engine.score([prompt], [[" card_arrival\n", " change_pin\n"]])[0]
    assert all(np.isfinite(v) and v < 0 for v in scores.values())


def test_malformed_batches_are_refused(engine):
    with pytest.raises(ValueError, match="1 prompts but 2 candidate lists"):
        engine.score(["p"], [[" a\n"], [" b\n"]])
    with pytest.raises(ValueError, match="duplicate candidates"):
        engine.score(["p"], [[" a\n", " a\n"]])
    with pytest.raises(TypeError, match="wrap a single prompt"):
        engine.score("p", [[" a\n"]])
