import socket
import time

import numpy as np
import pytest

from labelcascade.agent import Cascade, EngineSlot, Learner, Policy
from labelcascade.agent.candidates import top_candidates
from labelcascade.agent.engines.base import common_prefix
from labelcascade.agent.engines.llamacpp import LlamaCppEngine
from labelcascade.fallback import LinearSVMClassifier
from labelcascade.prompts import CONTENT_FREE
from labelcascade.records import Route, Source
from labelcascade.retrieval import ExampleStore
from labelcascade.task import Task

from ..conftest import BANKING_TASK, banking_messages


def test_labels_without_examples_get_zero_probability_and_task_order(embedder):
    task = Task.from_labels(["weather", "card", "refund"])
    texts = ["will it rain tomorrow", "is it sunny today", "my card is broken", "my card was declined"]
    fallback = LinearSVMClassifier().fit(embedder.embed(texts), ["weather", "weather", "card", "card"])
    prediction = Cascade(task, embedder, fallback).classify(["my card does not work"])[0]
    assert list(prediction.probabilities) == ["weather", "card", "refund"]
    assert prediction.probabilities["refund"] == 0.0
    assert prediction.label == "card" and prediction.labels == ["card"] and prediction.route is Route.FALLBACK
    assert prediction.confidence == max(prediction.probabilities.values())
    assert abs(sum(prediction.probabilities.values()) - 1.0) < 1e-6 and prediction.latency_ms > 0


def test_multi_label_answers_every_label_above_one_half(embedder):
    task = Task.from_labels(["sport", "money"], multi_label=True)
    texts = ["the team won the final", "the striker scored twice", "shares fell sharply", "the bank raised rates",
             "the club was sold for a record fee", "the player signed a huge contract"]
    labels = [("sport",), ("sport",), ("money",), ("money",), ("sport", "money"), ("sport", "money")]
    fallback = LinearSVMClassifier(multi_label=True).fit(embedder.embed(texts), labels)
    predictions = Cascade(task, embedder, fallback).classify(texts)
    for prediction in predictions:
        above = [label for label, p in prediction.probabilities.items() if p >= 0.5]
        assert sorted(prediction.labels) == sorted(above)
        assert prediction.label == (prediction.labels[0] if prediction.labels else None)
    assert np.mean([p.labels == ["sport"] or sorted(p.labels) == ["money", "sport"] for p in predictions[:2]]) == 1.0


def test_static_examples_are_the_first_labelled_ones_labels_in_turn_and_never_retrieved_again(embedder):
    task = Task.from_labels(["weather", "card", "refund"])
    store = ExampleStore(None, embedder_id=embedder.id, dim=embedder.dim)
    gold = [("will it rain tomorrow", "weather"), ("is it sunny today", "weather"), ("storm warning tonight", "weather"),
            ("my card is broken", "card"), ("my card was declined", "card")]
    store.add([t for t, _ in gold], [label for _, label in gold], embedder.embed([t for t, _ in gold]))
    store.add(["I want my money back"], ["refund"], embedder.embed(["I want my money back"]), source=Source.REVIEW)
    store.add(["refund the card fee"], ["refund"], embedder.embed(["refund the card fee"]), source=Source.LLM)
    fallback = LinearSVMClassifier().fit(embedder.embed([t for t, _ in gold]), [label for _, label in gold])
    cascade = Cascade(task, embedder, fallback, store=store, policy=Policy(static_examples=2, examples=2))
    static = cascade.static_examples()
    # two per label at most, people's labels only (gold, then reviewed), labels taken in turn
    assert [e.text for e in static] == ["will it rain tomorrow", "my card is broken", "I want my money back",
                                        "is it sunny today", "my card was declined"]
    shown = {e.id for e in static}
    for row in cascade.neighbors(embedder.embed(["is it going to rain", "my card does not work"])):
        assert len(row) == 1 and row[0].example.id not in shown  # only "storm warning tonight" is left to retrieve
    assert Cascade(task, embedder, fallback, store=store).static_examples() == []  # off by default


def test_static_examples_the_static_part_has_no_room_for_stay_retrievable(embedder):
    task = Task.from_labels(["weather", "card"])
    store = ExampleStore(None, embedder_id=embedder.id, dim=embedder.dim)
    # each text is cut to MAX_STATIC_EXAMPLE_BYTES in the static part, and MAX_STATIC_BYTES holds only so many
    long = [(f"{topic} " + "and so on " * 60, label) for i in range(8) for topic, label in
            ((f"rain and storms on day {i}", "weather"), (f"my card number {i} was declined", "card"))]
    store.add([t for t, _ in long], [label for _, label in long], embedder.embed([t for t, _ in long]))
    fallback = LinearSVMClassifier().fit(embedder.embed([t for t, _ in long]), [label for _, label in long])
    cascade = Cascade(task, embedder, fallback, store=store, policy=Policy(static_examples=8, examples=2))
    static = cascade.static_examples()
    assert 0 < len(static) < len(long)  # the cap cut some of the 8 per label asked for
    # what a prompt shows is exactly what retrieval leaves out
    assert list(cascade.renderer.with_static_examples(static).static_examples) == static
    shown = {e.id for e in static}
    for row in cascade.neighbors(embedder.embed(["is it going to rain", "my card does not work"])):
        assert len(row) == 2 and not shown & {neighbor.example.id for neighbor in row}


def test_a_text_left_out_never_gets_its_own_stored_example(embedder):
    """Calibrating on the stored examples asks the LLM about texts the store holds: shown with their own label, the
    LLM would look right for free."""
    task = Task.from_labels(["weather", "card"])
    store = ExampleStore(None, embedder_id=embedder.id, dim=embedder.dim)
    texts = ["will it rain tomorrow", "is it sunny today", "storm warning tonight", "my card is broken",
             "my card was declined", "the card machine ate my card"]
    labels = ["weather"] * 3 + ["card"] * 3
    vectors = embedder.embed(texts)
    store.add(texts, labels, vectors)
    fallback = LinearSVMClassifier().fit(vectors, labels)
    cascade = Cascade(task, embedder, fallback, store=store, policy=Policy(examples=2))
    assert [row[0].example.text for row in cascade.neighbors(vectors)] == texts  # each text's nearest is itself
    rows = cascade.neighbors(vectors, left_out=texts)
    assert [len(row) for row in rows] == [2] * 6 and all(text not in [n.example.text for n in row]
                                                         for text, row in zip(texts, rows, strict=True))
    three = cascade.neighbors(vectors[:1], Policy(examples=3))[0]
    assert [n.example.text for n in rows[0]] == [n.example.text for n in three[1:]]  # the next ones move up


# --- the LLM branch, on the real embedded model ----------------------------------------------------------------

CHEAP = Policy(examples=2, max_candidates=3)  # short prompts and few candidates keep the real LLM quick


def banking_cascade(embedder, engine, policy: Policy, task: Task | None = None) -> Cascade:
    task = task or Task.from_yaml(BANKING_TASK)
    texts, labels = zip(*task.seed_examples(), strict=True)
    vectors = embedder.embed(list(texts))
    store = ExampleStore(None, embedder_id=embedder.id, dim=embedder.dim)
    store.add(texts, labels, vectors)
    fallback = LinearSVMClassifier().fit(vectors, [row[0] for row in labels])
    return Cascade(task, embedder, fallback, store=store, engine=EngineSlot(engine), policy=policy)


def test_one_slow_batch_does_not_degrade_the_batches_after_it(embedder, gemma):
    """A timed-out batch used to set the engine aside for 10 s, and every later batch of the call was answered
    `degraded` without asking it. One timeout now leaves the engine in use; two in a row set it aside."""
    texts = banking_messages()[0][:4]
    policy = CHEAP.model_copy(update={"accept_threshold": 1.0, "llm_batch": 1, "timeout_s": 1e-9})
    cascade = banking_cascade(embedder, gemma, policy)
    prompts = gemma.stats.prompts
    assert {p.route for p in cascade.classify(texts, learn=False)} == {Route.DEGRADED}
    assert gemma.stats.prompts - prompts == 2  # asked twice, both timed out; the last two were not asked

    cascade = banking_cascade(embedder, gemma, policy)
    assert cascade.classify(texts[:1], learn=False)[0].route is Route.DEGRADED  # one timeout
    cascade.policy = CHEAP.model_copy(update={"accept_threshold": 1.0, "llm_batch": 1})
    assert [p.route for p in cascade.classify(texts, learn=False)] == [Route.LLM] * 4  # not set aside


def test_the_accept_threshold_routes_between_fallback_and_llm(embedder, gemma):
    texts, _ = banking_messages()
    texts = texts[:3]
    never = banking_cascade(embedder, "llamacpp:default", CHEAP.model_copy(update={"accept_threshold": 0.0}))
    assert {p.route for p in never.classify(texts)} == {Route.FALLBACK}
    assert never.engine.loaded is None  # an engine nobody needs is never loaded

    always = banking_cascade(embedder, gemma, CHEAP.model_copy(update={"accept_threshold": 1.0}))
    fallback_only = always.probabilities(embedder.embed(texts))
    prompts_before = gemma.stats.prompts
    predictions = always.classify(texts)
    assert gemma.stats.prompts - prompts_before == len(texts)
    for prediction, fallback in zip(predictions, fallback_only, strict=True):
        assert prediction.route is Route.LLM and prediction.label in always.task.label_names
        assert len(prediction.evidence) == 2 and abs(sum(prediction.probabilities.values()) - 1) < 1e-6
        assert not np.allclose(list(prediction.probabilities.values()), fallback)  # the LLM's vote was pooled in

    halfway = float(np.median(always.certainty(fallback_only)))
    split = banking_cascade(embedder, gemma, CHEAP.model_copy(update={"accept_threshold": halfway}))
    for prediction, fallback in zip(split.classify(texts), fallback_only, strict=True):
        assert prediction.route is (Route.FALLBACK if fallback.max() >= halfway else Route.LLM)


@pytest.fixture
def unbatched_gemma():
    """One token per llama.cpp step (n_batch=1): batched scores move by tenths of a nat with the cache's layout (see
    LlamaCppEngine), and only unbatched ones are the same whatever was scored before."""
    engine = LlamaCppEngine(n_batch=1)
    yield engine
    engine.close()


def test_contextual_calibration_subtracts_the_content_free_prompts_scores(embedder, unbatched_gemma):
    """Each label's LLM score is its log-probability for the text less that for "N/A" in the same prompt, which
    shares everything up to the text: the twin costs the engine little beyond its own tokens and the labels."""
    gemma = unbatched_gemma
    text = "my card still hasn't arrived"
    calibrated = banking_cascade(embedder, gemma, CHEAP.model_copy(update={"contextual_calibration": True}))
    vectors = embedder.embed([text])
    proba, neighbors = calibrated.probabilities(vectors), calibrated.neighbors(vectors)
    chosen = top_candidates(proba[0], neighbors[0], calibrated.task.label_names, CHEAP.max_candidates)
    examples = [neighbor.example for neighbor in neighbors[0]]
    renderer = calibrated.renderer
    candidates = renderer.candidates([calibrated.task.label_names[j] for j in chosen])
    prompt, twin = renderer.render(text, examples).text, renderer.render(CONTENT_FREE, examples).text
    answer, baseline = gemma.score([prompt, twin], [candidates, candidates])

    before = vars(gemma.stats).copy()
    scores = calibrated.llm_scores([text], proba, neighbors).logprobs[0]
    computed = gemma.stats.computed_tokens - before["computed_tokens"]
    label_tokens = gemma.stats.candidate_tokens - before["candidate_tokens"]
    expected = [answer[c] - baseline[c] for c in candidates]
    np.testing.assert_allclose(scores[chosen], expected, atol=1e-4)
    assert np.isneginf(np.delete(scores, chosen)).all()
    prompt_tokens, twin_tokens = gemma.tokenize(prompt, bos=True), gemma.tokenize(twin, bos=True)
    shared = common_prefix(prompt_tokens, twin_tokens)  # the cache held the twin: each reuses what they share
    assert computed <= len(prompt_tokens) - shared + len(twin_tokens) - shared + label_tokens

    plain = banking_cascade(embedder, gemma, CHEAP)  # off by default
    np.testing.assert_allclose(plain.llm_scores([text], proba, neighbors).logprobs[0][chosen],
                               [answer[c] for c in candidates], atol=1e-4)


def test_static_examples_are_computed_once_for_all_texts(embedder, gemma):
    """The cached layout: the static examples sit in the prompt's static part, which the engine's prefix cache keeps,
    so a text after the first computes its own part of the prompt and the labels, not the examples again."""
    cascade = banking_cascade(embedder, gemma, CHEAP.model_copy(update={"static_examples": 1, "examples": 1}))
    texts = ["my card still hasn't arrived", "how do I close my account"]
    vectors = embedder.embed(texts)
    proba, neighbors = cascade.probabilities(vectors), cascade.neighbors(vectors)
    renderer = cascade._renderer_for(gemma, cascade.static_examples())
    assert len(renderer.static_examples) == len(cascade.task.labels)  # one per label, all in the static part
    cascade.llm_scores(texts[:1], proba[:1], neighbors[:1])
    before = vars(gemma.stats).copy()
    scores = cascade.llm_scores(texts[1:], proba[1:], neighbors[1:]).logprobs[0]
    computed = gemma.stats.computed_tokens - before["computed_tokens"]
    label_tokens = gemma.stats.candidate_tokens - before["candidate_tokens"]
    prompt = renderer.render(texts[1], [neighbor.example for neighbor in neighbors[1]]).text
    static = len(gemma.tokenize(renderer.static, bos=True))
    assert static > 300 and computed <= len(gemma.tokenize(prompt, bos=True)) - static + 1 + label_tokens
    assert np.isfinite(scores).sum() == CHEAP.max_candidates


def test_an_llm_weight_of_zero_never_asks_the_llm(embedder):
    cascade = banking_cascade(embedder, "llamacpp:default", Policy(accept_threshold=1.0, llm_weight=0.0))
    assert {p.route for p in cascade.classify(["my card is lost"])} == {Route.FALLBACK}
    assert cascade.engine.loaded is None


def test_an_unreachable_engine_degrades_to_the_fallback(embedder):
    with socket.socket() as sock:  # a port nobody listens on: a real connection failure, not a mock
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cascade = banking_cascade(embedder, f"vllm:http://127.0.0.1:{port}/v1#gemma", Policy(accept_threshold=1.0))
    texts, _ = banking_messages()
    expected = cascade.probabilities(embedder.embed(texts[:4])).argmax(axis=1)
    predictions = cascade.classify(texts[:4])
    assert [p.route for p in predictions] == [Route.DEGRADED] * 4
    assert [p.label for p in predictions] == [cascade.task.label_names[i] for i in expected]
    started = time.perf_counter()
    assert cascade.classify(texts[4:5])[0].route is Route.DEGRADED
    assert time.perf_counter() - started < 1.0  # while the engine is known to be down it is not tried again


def test_abstains_under_the_threshold_only_when_the_task_allows_it(embedder):
    allowing = Task.from_yaml(BANKING_TASK)  # the banking example allows abstaining (a chat router's task)
    task = allowing.model_copy(update={"allow_abstain": False})
    policy = Policy(accept_threshold=0.0, abstain_threshold=0.999999)
    texts = ["what is the meaning of life", "my card is lost"]
    abstaining = banking_cascade(embedder, "llamacpp:default", policy, allowing).classify(texts)
    answering = banking_cascade(embedder, "llamacpp:default", policy, task).classify(texts)
    assert abstaining[0].route is Route.ABSTAIN and abstaining[0].label is None and abstaining[0].labels == []
    assert abstaining[0].probabilities == answering[0].probabilities  # the probabilities are still reported
    assert all(p.route is Route.FALLBACK and p.label for p in answering)


def test_llm_answers_are_learned_and_the_retrained_fallback_answers_differently(embedder, gemma):
    policy = CHEAP.model_copy(
        update={"accept_threshold": 1.0, "llm_weight": 1.0, "learn_threshold": 0.0, "retrain_every": 3}
    )
    cascade = banking_cascade(embedder, gemma, policy)
    saved = []
    cascade.learner = Learner(cascade.store, multi_label=False, C=1.0, save=saved.append)
    texts, _ = banking_messages()
    vectors = embedder.embed(texts[:3])
    first_model = cascade.fallback

    learned = cascade.classify(texts[:2])
    assert cascade.learner.pending == 2 and cascade.fallback is first_model and not saved
    stored = {example.text: example for example in cascade.store.examples(Source.LLM)}
    assert [stored[t].labels for t in texts[:2]] == [(p.label,) for p in learned]
    assert [stored[t].confidence for t in texts[:2]] == pytest.approx([p.confidence for p in learned])

    learned.append(cascade.classify(texts[2:3])[0])  # the third LLM label triggers the retraining
    assert cascade.fallback is not first_model and saved == [cascade.fallback] and cascade.learner.pending == 0
    # The retrained fallback leans towards what the LLM taught it: for each learned text, the SVM's margin of the
    # LLM's label over the best other label grew (raw decision scores: the probabilities' temperature is refitted).
    for i, prediction in enumerate(learned):
        before, after = (margin(model, vectors[i], prediction.label) for model in (first_model, cascade.fallback))
        assert after > before
    assert not np.allclose(cascade.fallback.predict_proba(vectors), first_model.predict_proba(vectors))
    # The LLM's later prompts show people's labels only, never its own earlier answers (policy.examples_from_llm).
    llm_ids = {example.id for example in cascade.store.examples(Source.LLM)}
    asked_again = cascade.classify(texts[:3], learn=False)
    assert all(p.evidence and not set(p.evidence) & llm_ids for p in asked_again)  # its own answers are the nearest


def margin(model: LinearSVMClassifier, vector: np.ndarray, label: str) -> float:
    scores = model.decision_function(vector[None])[0]
    j = list(model.classes_).index(label)
    return float(scores[j] - np.delete(scores, j).max())


def test_multi_label_tasks_ask_the_llm_one_question_per_unsure_label(embedder, gemma):
    task = Task.from_labels(["sport", "money"], multi_label=True)
    texts = ["the team won the final", "the striker scored twice", "shares fell sharply", "the bank raised rates",
             "the club was sold for a record fee", "the player signed a huge contract"]
    labels = [("sport",), ("sport",), ("money",), ("money",), ("sport", "money"), ("sport", "money")]
    vectors = embedder.embed(texts)
    store = ExampleStore(None, embedder_id=embedder.id, dim=embedder.dim)
    store.add(texts, labels, vectors)
    fallback = LinearSVMClassifier(multi_label=True).fit(vectors, labels)
    policy = Policy(accept_threshold=1.0, examples=2)
    cascade = Cascade(task, embedder, fallback, store=store, engine=EngineSlot(gemma), policy=policy)
    prompts_before = gemma.stats.prompts
    query = ["the goalkeeper was fined by the league", "interest rates went up again"]
    predictions = cascade.classify(query)
    assert gemma.stats.prompts - prompts_before == 2 * len(query)  # one yes/no question per label
    fallback_only = cascade.probabilities(embedder.embed(query))
    for prediction, alone in zip(predictions, fallback_only, strict=True):
        assert prediction.route is Route.LLM
        assert sorted(prediction.labels) == sorted(l for l, p in prediction.probabilities.items() if p >= 0.5)
        assert all(0 <= p <= 1 for p in prediction.probabilities.values())
        assert not np.allclose(list(prediction.probabilities.values()), alone)
