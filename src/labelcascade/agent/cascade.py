"""The cascade: one embedding per text, the fallback first, the LLM only when the fallback is unsure.

This is the classification policy of DESIGN.md ("One classification"):
1. embed the texts once; the fallback gives probabilities over all of the task's labels;
2. a text whose answer clears the policy's accept threshold is answered by the fallback (route `fallback`);
3. the others get their k nearest stored examples, their candidate labels narrowed to the most plausible m, and
   a prompt; the engine scores the candidates (under `contextual_calibration`, again with the content-free text
   "N/A" in the text's place) and its probabilities are pooled with the fallback's (route `llm`);
   for multi-label tasks the LLM answers a yes/no question for each unsure label instead;
4. an answer under the abstain threshold, in a task that allows it, becomes no answer (route `abstain`);
5. confident LLM answers are handed to the learner, which stores them and retrains the fallback every N (the policy
   is kept: the retrained fallback's probabilities are calibrated again);
6. when the engine fails or times out, the fallback's answer stands, marked `degraded`; nothing is raised.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.special import expit

from labelcascade.agent.candidates import top_candidates
from labelcascade.agent.engine_slot import EngineSlot
from labelcascade.agent.engines import EngineError
from labelcascade.agent.label_bias import biased_softmax
from labelcascade.agent.learning import Learner
from labelcascade.agent.policy import Policy, mix
from labelcascade.fallback import LinearSVMClassifier
from labelcascade.prompts import PromptRenderer, static_examples_that_fit
from labelcascade.prompts.render import AUTO, CONTENT_FREE, chat_turns
from labelcascade.records import Example, Neighbor, Prediction, Route, Source
from labelcascade.retrieval import Embedder, ExampleStore
from labelcascade.task import Task

logger = logging.getLogger(__name__)


def renderer_for_engine(renderer: PromptRenderer, engine) -> PromptRenderer:
    """`renderer` for this engine's model: `chat` (and `auto`) in the model's own turns when the engine reads a chat
    template from it (a GGUF's), `auto` as `completion` when it does not. A chat template that cannot be read leaves
    `auto` on `completion` (with a warning) and is an EngineError for `chat`."""
    template, turns = getattr(engine, "chat_template", None), None
    if template is not None:
        try:
            turns = chat_turns(template.text, bos_token=template.bos_token, eos_token=template.eos_token)
        except ValueError as error:
            if renderer.template != AUTO:
                raise EngineError(f"{engine.spec}: {error}") from None
            logger.warning("%s: prompted as a base model (the 'completion' template): %s", engine.spec, error)
    return renderer.for_model(turns)


@dataclass
class Answers:
    """One `Cascade.run`: the final predictions, how sure the fallback was (what the routing decided by) and, when
    asked for, what the fallback alone said, for reports that compare the two without embedding the texts again."""

    predictions: list[Prediction]
    fallback: list[Prediction]
    certainty: np.ndarray


@dataclass
class LLMProgress:
    """Where one `Cascade.run` stands with the LLM, handed to its `on_llm` hook: once before the first LLM call
    (`indices` empty), then after each batch of answers, so a long call can show progress or keep the LLM's answers
    before it returns (a labelling job puts them in its answer cache: a kill does not lose them).

    `indices`: positions, in the call's texts, answered by this batch (route `llm`, or `degraded` when the engine
    failed); `predictions`: their answers, exactly as the call returns them; `sent` and `total`: texts sent to the
    LLM so far, and in all, by this call."""

    indices: list[int]
    predictions: list[Prediction]
    sent: int
    total: int


@dataclass
class LLMScores:
    """What the LLM said about some texts, before temperature and pooling.

    Single-label: `logprobs[i, j]` is label j's log-probability as the answer to text i, -inf where j was not a
    candidate. Multi-label: the yes-minus-no log-odds that label j applies, NaN where j was not asked. Under
    contextual calibration, less the same for the content-free text (a log-ratio; the softmax normalises it).
    """

    logprobs: np.ndarray
    evidence: list[list[int]] = field(default_factory=list)


class Cascade:
    """Answers texts for one task; see the module docstring for the policy."""

    def __init__(
        self,
        task: Task,
        embedder: Embedder,
        fallback: LinearSVMClassifier,
        *,
        store: ExampleStore | None = None,
        engine: EngineSlot | None = None,
        renderer: PromptRenderer | None = None,
        policy: Policy | None = None,
        learner: Learner | None = None,
    ):
        """Without an engine every answer comes from the fallback; without a store the LLM gets no examples."""
        self.task = task
        self.embedder = embedder
        self.store = store
        self.engine = engine
        self.renderer = renderer or PromptRenderer(task)
        self.policy = policy or Policy()
        self.learner = learner
        self._labels = task.label_names
        self._engine_renderer: tuple[object, list[Example], PromptRenderer] | None = None  # see _renderer_for
        self.install(fallback)

    def install(self, fallback: LinearSVMClassifier) -> None:
        """Start answering with another fallback model (after a retrain)."""
        # Columns of the fallback's probabilities, placed among all of the task's labels (a label with no
        # examples yet gets probability 0), so callers always see the same label order.
        unknown = [str(label) for label in fallback.classes_ if label not in self._labels]
        if unknown:
            raise ValueError(
                f"the fallback model answers labels that the task does not have ({', '.join(unknown)}): the task "
                "was changed or damaged after the model was trained; restore the task file, or retrain"
            )
        columns = np.array([self._labels.index(label) for label in fallback.classes_])
        self.fallback, self._columns = fallback, columns

    # --- the two arms ---------------------------------------------------------------------------------------

    def probabilities(self, vectors: np.ndarray, texts: Sequence[str] | None = None) -> np.ndarray:
        """The fallback's probabilities (n, n_task_labels) in task label order, for these texts' vectors (and the
        texts, which a fallback with TF-IDF features reads too: `LinearSVMClassifier.uses_texts`)."""
        fallback, columns = self.fallback, self._columns  # read together: `install` may swap them
        proba = np.zeros((len(vectors), len(self._labels)))
        proba[:, columns] = fallback.predict_proba(vectors, texts)
        return proba

    def certainty(self, proba: np.ndarray) -> np.ndarray:
        """How sure each answer is: the top probability; for multi-label, the least sure of the yes/no decisions."""
        if self.task.multi_label:
            return np.maximum(proba, 1.0 - proba).min(axis=1)
        return proba.max(axis=1)

    def neighbors(self, vectors: np.ndarray, policy: Policy | None = None, *,
                  left_out: Sequence[str] | None = None) -> list[list[Neighbor]]:
        """The `policy.examples` nearest stored examples of each text (none without a store) under `policy` (default:
        the cascade's); people's labels only unless the policy shows the LLM its own answers too; never one of the
        static examples, which the prompt shows already. `left_out`: one text per row whose stored example that row
        must not get (calibrating on the stored examples themselves: a text shown with its own label is no test)."""
        policy = policy or self.policy
        if self.store is None or policy.examples == 0 or len(self.store) == 0:
            return [[] for _ in vectors]
        sources = None if policy.examples_from_llm else (Source.GOLD, Source.REVIEW)
        shown = {example.id for example in self.static_examples(policy)}
        extra = 0 if left_out is None else 1  # the store holds a text once, so one more result covers it
        rows = self.store.search(vectors, k=policy.examples + len(shown) + extra, sources=sources)
        own = [None] * len(rows) if left_out is None else list(left_out)
        return [[neighbor for neighbor in row if neighbor.example.id not in shown and neighbor.example.text != text]
                [: policy.examples] for row, text in zip(rows, own, strict=True)]

    def static_examples(self, policy: Policy | None = None) -> list[Example]:
        """The examples in every prompt's static part (`Policy.static_examples` per label): the first ones people
        labelled (gold, then reviewed), labels taken in turn, so the list is balanced, and stable as the store
        grows (the engine's prefix cache keeps serving it); only those the static part has room for, so the ones
        it cuts stay retrievable."""
        per_label = (policy or self.policy).static_examples
        if self.store is None or per_label == 0:
            return []
        by_label: dict[str, list[Example]] = {name: [] for name in self._labels}
        for source in (Source.GOLD, Source.REVIEW):
            for example in self.store.examples(source):
                first = by_label.get(example.label)
                if first is not None and len(first) < per_label:
                    first.append(example)
        in_turn = [row[turn] for turn in range(per_label) for row in by_label.values() if turn < len(row)]
        return static_examples_that_fit(in_turn)

    def static_part_shows_every_label(self, policy: Policy) -> bool:
        """Whether `policy`'s static part would show at least one example of each label. One that leaves labels
        out teaches a small model that they are rare, for every text (BENCHMARKS.md, "The layout calibrate
        chooses": csldcp, whose static part has room for a few of its labels)."""
        shown = {example.label for example in self.static_examples(policy)}
        return all(name in shown for name in self._labels)

    def llm_scores(
        self,
        texts: Sequence[str],
        proba: np.ndarray,
        neighbors: Sequence[Sequence[Neighbor]],
        policy: Policy | None = None,
    ) -> LLMScores:
        """Ask the engine about these texts (one engine call for all of them) under `policy` (default: the
        cascade's), given their fallback probabilities and neighbours; raises EngineError."""
        engine = self.engine.get()
        policy = policy or self.policy
        renderer = self._renderer_for(engine, self.static_examples(policy))
        yes_no = list(renderer.yes_no)
        m = policy.max_candidates
        logprobs = np.full(proba.shape, np.nan if self.task.multi_label else -np.inf)
        twins = 2 if policy.contextual_calibration else 1  # each prompt, then its content-free twin
        prompts, options, cells = [], [], []  # cells: which (text, labels) each prompt (and twin) answers
        for i, (text, row) in enumerate(zip(texts, neighbors, strict=True)):
            examples = [neighbor.example for neighbor in row]
            shown = (text, CONTENT_FREE)[:twins]
            if self.task.multi_label:
                order = np.argsort(np.abs(proba[i] - 0.5), kind="stable")
                sure = policy.accepts(np.maximum(proba[i], 1 - proba[i]))
                unsure = [j for j in order if not sure[j]][:m]
                for j in unsure:
                    prompts += [renderer.render_question(t, self._labels[j], examples).text for t in shown]
                    options += [yes_no] * twins
                    cells.append((i, [j]))
            else:
                chosen = top_candidates(proba[i], row, self._labels, m)
                prompts += [renderer.render(t, examples).text for t in shown]
                options += [renderer.candidates([self._labels[j] for j in chosen])] * twins
                cells.append((i, chosen))
        try:
            scores = engine.score(prompts, options, timeout=policy.timeout_s * len(texts))
        except EngineError as error:
            self.engine.failed(error)
            raise
        self.engine.answered()
        answers = scores[::twins]
        baselines = scores[1::twins] if twins == 2 else [{}] * len(answers)
        for (i, chosen), option, answer, baseline in zip(cells, options[::twins], answers, baselines, strict=True):
            calibrated = {candidate: answer[candidate] - baseline.get(candidate, 0.0) for candidate in option}
            if self.task.multi_label:
                logprobs[i, chosen[0]] = calibrated[yes_no[0]] - calibrated[yes_no[1]]
            else:
                logprobs[i, chosen] = [calibrated[candidate] for candidate in option]
        return LLMScores(logprobs, [[neighbor.example.id for neighbor in row] for row in neighbors])

    def _renderer_for(self, engine, static_examples: list[Example]) -> PromptRenderer:
        """`renderer_for_engine` of the cascade's renderer with these static examples, worked out once per engine
        and static examples."""
        kept = self._engine_renderer
        if kept is None or kept[0] is not engine or kept[1] != static_examples:
            renderer = renderer_for_engine(self.renderer, engine).with_static_examples(static_examples)
            self._engine_renderer = kept = (engine, static_examples, renderer)
        return kept[2]

    def llm_probabilities(self, logprobs: np.ndarray, temperature: float, label_bias: dict[str, float] | None = None
                          ) -> np.ndarray:
        """Probabilities from LLM scores: softmax over candidates (after the per-label offsets, if any), or P(yes)
        per asked label (NaN elsewhere)."""
        if self.task.multi_label:
            return expit(logprobs / temperature)
        bias = np.array([label_bias.get(name, 0.0) for name in self._labels]) if label_bias else None
        return biased_softmax(logprobs, temperature, bias)

    def pool(self, proba: np.ndarray, llm_proba: np.ndarray, weight: float) -> np.ndarray:
        """The fallback's and the LLM's probabilities pooled; multi-label labels not asked keep the fallback's."""
        if self.task.multi_label:
            return np.where(np.isnan(llm_proba), proba, mix(proba, np.nan_to_num(llm_proba), weight))
        return mix(proba, llm_proba, weight)

    # --- answering ------------------------------------------------------------------------------------------

    def classify(
        self,
        texts: Sequence[str],
        *,
        llm_limit: int | None = None,
        learn: bool = True,
        on_llm: Callable[[LLMProgress], None] | None = None,
    ) -> list[Prediction]:
        """One prediction per text. Texts are embedded together; unsure ones go to the LLM in batches.

        `llm_limit` caps how many of these texts are sent to the LLM (a job's budget); the unsure texts beyond it,
        in order, keep the fallback's answer. `learn=False` answers without learning (estimates, dry runs).
        `on_llm` is called before the first LLM batch and after each (see `LLMProgress`).
        """
        return self.run(texts, llm_limit=llm_limit, learn=learn, on_llm=on_llm).predictions

    def run(
        self,
        texts: Sequence[str],
        *,
        llm_limit: int | None = None,
        learn: bool = True,
        fallback_answers: bool = False,
        vectors: np.ndarray | None = None,
        on_llm: Callable[[LLMProgress], None] | None = None,
    ) -> Answers:
        """`classify`, also returning the fallback's certainties and, with `fallback_answers`, its own answers
        (built only then: classifying does not need them). `vectors`: the texts' embeddings, when a stage before
        this one made them (a Ray job's fallback stage hands them to its LLM stage), so they are not made twice."""
        start = time.perf_counter()
        vectors = self.embedder.embed(texts) if vectors is None else vectors
        proba = self.probabilities(vectors, texts)
        fallback_proba = proba.copy() if fallback_answers else proba[:0]  # the LLM's answers are pooled into proba
        certainty = self.certainty(proba)
        routes = [Route.FALLBACK] * len(texts)
        evidence: list[list[int]] = [[] for _ in texts]
        spent = np.full(len(texts), (time.perf_counter() - start) / max(len(texts), 1))
        policy = self.policy
        unsure = np.flatnonzero(~policy.accepts(certainty))[:llm_limit]
        if self.engine is not None and policy.asks_llm and len(unsure):
            if on_llm is not None:
                on_llm(LLMProgress([], [], 0, len(unsure)))
            sent = 0
            for batch in np.array_split(unsure, int(np.ceil(len(unsure) / policy.llm_batch))):
                began = time.perf_counter()
                self._ask_llm(batch, texts, vectors, proba, routes, evidence)
                spent[batch] += (time.perf_counter() - began) / len(batch)
                sent += len(batch)
                if on_llm is not None:
                    answered = [self._prediction(proba[i], routes[i], evidence[i], spent[i] * 1000) for i in batch]
                    on_llm(LLMProgress(batch.tolist(), answered, sent, len(unsure)))
        predictions = [
            self._prediction(proba[i], routes[i], evidence[i], spent[i] * 1000) for i in range(len(texts))
        ]
        if learn:
            self._learn(texts, vectors, predictions)
        fallback = [self._prediction(row, Route.FALLBACK, [], 0.0) for row in fallback_proba]
        return Answers(predictions, fallback, certainty)

    def _ask_llm(self, batch, texts, vectors, proba, routes, evidence) -> None:
        """Pool the LLM's answer into `proba` for the texts in `batch` (in place), or mark them degraded."""
        neighbors = self.neighbors(vectors[batch])
        try:
            scores = self.llm_scores([texts[i] for i in batch], proba[batch], neighbors)
        except EngineError:
            for i in batch:
                routes[i] = Route.DEGRADED
            return
        policy = self.policy
        llm_proba = self.llm_probabilities(scores.logprobs, policy.llm_temperature, policy.llm_label_bias)
        proba[batch] = self.pool(proba[batch], llm_proba, policy.llm_weight)
        for i, ids in zip(batch, scores.evidence, strict=True):
            routes[i], evidence[i] = Route.LLM, ids

    def _prediction(self, proba: np.ndarray, route: Route, evidence: list[int], latency_ms: float) -> Prediction:
        probabilities = dict(zip(self._labels, proba.tolist(), strict=True))
        if self.task.multi_label:
            chosen = [i for i in np.argsort(-proba) if proba[i] >= 0.5]
            labels = [self._labels[i] for i in chosen]
            # The answer's probability is that of its least sure label; an empty answer's is that no label applies.
            confidence = float(proba[chosen].min()) if chosen else float(1.0 - proba.max())
        else:
            best = int(proba.argmax())
            labels, confidence = [self._labels[best]], float(proba[best])
        if self.task.allow_abstain and confidence < self.policy.abstain_threshold:
            labels, route = [], Route.ABSTAIN
        return Prediction(
            label=labels[0] if labels else None,
            labels=labels,
            confidence=confidence,
            probabilities=probabilities,
            route=route,
            evidence=evidence,
            latency_ms=latency_ms,
        )

    def learn(self, texts: Sequence[str], predictions: Sequence[Prediction]) -> None:
        """Learn from answers made elsewhere with this cascade's policy (a Ray job's workers answer on copies of
        the workspace; their answers come back here): the confident LLM answers are embedded and stored, and the
        fallback retrained when due, as if they had been made here."""
        keep = self._learnable(predictions)
        if keep:
            self._learn([texts[i] for i in keep], self.embedder.embed([texts[i] for i in keep]),
                        [predictions[i] for i in keep])

    def _learnable(self, predictions: Sequence[Prediction]) -> list[int]:
        """The answers the learner takes: confident LLM answers with a label, when the policy learns."""
        if self.learner is None or not self.policy.learn:
            return []
        return [
            i for i, p in enumerate(predictions)
            if p.route is Route.LLM and p.labels and p.confidence >= self.policy.learn_threshold
        ]

    def _learn(self, texts: Sequence[str], vectors: np.ndarray, predictions: Sequence[Prediction]) -> None:
        """Hand confident LLM answers to the learner; install the retrained fallback it may return."""
        keep = self._learnable(predictions)
        if not keep:
            return
        retrained = self.learner.learn(
            [texts[i] for i in keep],
            [predictions[i].labels for i in keep],
            [predictions[i].confidence for i in keep],
            vectors[keep],
            retrain_every=self.policy.retrain_every,
        )
        if retrained is not None:
            self.install(retrained)
