"""A Hugging Face causal LM run in-process by transformers (PyTorch), from a local checkpoint folder.

Scoring is exact (the candidate tokens' log-probabilities under the model, nothing sampled or constrained) and
shares work in two ways:
- Prefix reuse: the keys and values of the previous prompt are kept, and a new prompt only evaluates what
  follows the longest common token prefix (the task's static part at least, see `prompts`).
- One forward for the prompts of a call (`batch_texts`): what follows the prefix they all share is evaluated as one
  right-padded batch on top of that prefix's keys and values, instead of one forward per prompt. On a GPU a forward
  of one short suffix leaves most of the device idle (BENCHMARKS.md, "One GPU LLM worker"); each prompt's
  candidates are then scored from its own row of the batch's cache, as below.
- One batched forward for all candidates of a prompt: the prompt's keys and values are repeated once per
  candidate and every candidate's tokens but its last run on top of them (right-padded, with an attention mask;
  padding after a causal sequence cannot change what comes before it). A candidate's first token needs no
  evaluation at all: its probability comes from the prompt's last logits. The output layer (262k words for Gemma)
  runs only on the positions whose next-token distribution is needed, not on padding.
No constrained decoding (outlines or other): the log-probability of every candidate is computed directly, which
is exact and needs no generation.

The cache is a plain (full-attention) `DynamicCache` rebuilt from tensors this engine owns, whatever the model's
layer types: a sliding-window cache drops keys that an earlier prefix may need again, so it could not be cut back
to a shorter prefix. The attention masks still apply each layer's sliding window, so scores are those of a forward
pass from scratch (the tests check this on prompts longer than Gemma 3's 512-token window).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path

from labelcascade.agent.engines.base import EngineError, ScoringEngine, common_prefix, reusable_prefix, version_at_least

MIN_TRANSFORMERS_VERSION = (4, 56)  # `dtype=` in from_pretrained, DynamicCache made of layers
INSTALL = "pip install 'labelcascade[transformers]'"


class TransformersEngine(ScoringEngine):
    """Scores candidates with a local Hugging Face checkpoint."""

    name = "transformers"

    def __init__(
        self,
        model_path: str | Path,
        *,
        device: str | None = None,
        dtype: str = "float32",
        n_batch: int = 512,
        max_length: int | None = None,
        n_threads: int | None = None,
        batch_texts: bool | None = None,
    ):
        """`device` is "cpu" or "cuda"/"cuda:N"; by default the GPU when torch sees one (so that an LLM worker of a
        Ray job given a GPU uses it), else the CPU. `dtype` is a torch dtype name;
        float32 by default so that scores match other float32 engines closely (bfloat16 moves them visibly).
        Prompts are evaluated `n_batch` tokens per step, with the deadline checked between steps. `n_threads` sets
        torch's CPU threads for the whole process (torch.set_num_threads); on a CPU that other processes keep busy,
        fewer threads than cores can be several times faster. `batch_texts`: the prompts of one call evaluated as one
        batch after their shared prefix (see the module docstring); by default on a GPU only, where one short
        forward leaves the device mostly idle; on this project's CPU it took the time one prompt at a time does
        (BENCHMARKS.md, "The job's LLM prompts on this CPU").
        """
        try:
            import torch
            import transformers
            from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache
        except ImportError as error:
            raise EngineError(f"the transformers engine needs torch and transformers: {INSTALL}") from error
        version = transformers.__version__
        if not version_at_least(version, MIN_TRANSFORMERS_VERSION):
            raise EngineError(f"transformers {version} is too old for this engine: {INSTALL}")
        path = Path(model_path)
        if not (path / "config.json").is_file():
            raise EngineError(f"{path}: no Hugging Face checkpoint (config.json) in this folder")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise EngineError(f"device {device!r} asked for, but torch sees no CUDA GPU")
        torch_dtype = getattr(torch, dtype, None)
        if not isinstance(torch_dtype, torch.dtype):
            raise EngineError(f"unknown torch dtype {dtype!r}")
        if n_threads:
            torch.set_num_threads(n_threads)
        self._torch, self._cache_class = torch, DynamicCache
        # The spec names what changes the scores, so that the engine loaded again from it (a workspace reopened, a Ray
        # worker) is the same: the dtype, when not the default.
        super().__init__(f"transformers:{path}" + (f"#{dtype}" if dtype != "float32" else ""))
        try:
            config = AutoConfig.from_pretrained(path, local_files_only=True)
            self._tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.check_bos(config.model_type)  # before loading the weights, which would be wasted
            self._model = AutoModelForCausalLM.from_pretrained(
                path, local_files_only=True, dtype=torch_dtype, use_safetensors=True  # never a pickled .bin
            )
        except (OSError, ValueError) as error:
            raise EngineError(f"transformers could not load {path}: {error}") from error
        self._model.to(device).eval()
        # The keyword the model's forward takes its cache by: `cache` in newer transformers, which still accept the
        # older `past_key_values` with a warning that it goes in 5.40; older ones know only `past_key_values`.
        forward = inspect.signature(self._model.forward).parameters
        self._cache_keyword = "cache" if "cache" in forward else "past_key_values"
        self._device = torch.device(device)
        self._batch_texts = self._device.type == "cuda" if batch_texts is None else batch_texts
        self._n_batch = n_batch
        self._max_length = max_length or getattr(config, "max_position_embeddings", None) or 4096
        self._pad = self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else 0
        self._cached: list[int] = []  # the tokens whose keys and values `_kv` holds, in order
        self._kv: list[tuple] = []  # per layer (keys, values), batch 1, shape [1, heads, len(_cached), head_dim]

    def tokenize(self, text: str, *, bos: bool, deadline: float | None = None) -> list[int]:
        # The prompt with the tokenizer's special tokens (<bos>); a candidate continues it, so without.
        return list(self._tokenizer(text, add_special_tokens=bos)["input_ids"])

    def _score(
        self, prompts: Sequence[str], candidates: Sequence[Sequence[str]], deadline: float | None
    ) -> list[dict[str, float]]:
        with self._torch.inference_mode():
            prompt_ids = [self.tokenize(prompt, bos=True) for prompt in prompts]
            encoded = [[self.candidate_ids(option) for option in options] for options in candidates]
            for ids, options in zip(prompt_ids, encoded, strict=True):
                if len(ids) + max(map(len, options)) > self._max_length:
                    raise EngineError(f"prompt of {len(ids)} tokens does not fit the context of {self._max_length}")
            self.stats.prompts += len(prompts)
            self.stats.prompt_tokens += sum(map(len, prompt_ids))
            if self._batch_texts and len(prompts) > 1:
                return self._score_batch(prompt_ids, encoded, candidates, deadline)
            scores = []
            for ids, options, names in zip(prompt_ids, encoded, candidates, strict=True):
                first = self._extend(ids, deadline)
                scores.append(self._score_candidates(self._kv, len(ids), options, names, first, deadline))
            return scores

    def _extend(self, prompt_ids: list[int], deadline: float | None):
        """Bring the cache to `prompt_ids`, evaluating only what follows the cached prefix (at least the last token,
        for its logits); the log-probabilities of the token after the prompt."""
        reuse = reusable_prefix(self._cached, prompt_ids)
        self._kv = [(keys[:, :, :reuse], values[:, :, :reuse]) for keys, values in self._kv] if reuse else []
        self._cached = self._cached[:reuse]
        for start in range(reuse, len(prompt_ids), self._n_batch):
            self.check_deadline(deadline)
            chunk = prompt_ids[start : start + self._n_batch]
            cache = self._cache(self._kv)
            logprobs = self._forward(self._torch.tensor([chunk], device=self._device), cache, logits_to_keep=1)
            self._kv = [tuple(layer[:2]) for layer in cache]  # only now: a failed step leaves the old prefix
            self._cached += chunk
            self.stats.computed_tokens += len(chunk)
        return logprobs[0, -1]

    def _score_batch(self, prompt_ids: list[list[int]], encoded: list, candidates: Sequence[Sequence[str]],
                     deadline: float | None) -> list[dict[str, float]]:
        """The prompts' shared prefix through the cache, then every prompt's rest as one right-padded batch on top
        of it (padding after a sequence cannot change what comes before it, and every real token keeps the position
        it has alone, so sliding windows apply as they would), then each prompt's candidates from its own row."""
        torch = self._torch
        shared = min(min(common_prefix(prompt_ids[0], ids) for ids in prompt_ids[1:]), min(map(len, prompt_ids)) - 1)
        if shared:
            self._extend(prompt_ids[0][:shared], deadline)
        else:
            self._kv, self._cached = [], []
        rest = [ids[shared:] for ids in prompt_ids]
        inputs, mask = self._right_padded(rest, shared)
        rows, width = inputs.shape
        last = torch.zeros((rows, width), dtype=torch.bool)  # each prompt's last token: its logits are the ones needed
        for row, ids in enumerate(rest):
            last[row, len(ids) - 1] = True
        kv = self._kv
        firsts = []
        for start in range(0, width, self._n_batch):
            self.check_deadline(deadline)
            end = min(width, start + self._n_batch)
            cache = self._cache(kv, rows)
            logprobs = self._forward(inputs[:, start:end].to(self._device), cache,
                                     attention_mask=mask[:, : shared + end].to(self._device), rows=last[:, start:end])
            kv = [tuple(layer[:2]) for layer in cache]
            firsts.append((last[:, start:end].any(dim=1), logprobs))
            self.stats.computed_tokens += rows * (end - start)  # padding included: the layers evaluate it too
        first = [None] * rows
        for present, logprobs in firsts:  # rows come out in order, one per prompt whose last token was in the step
            for row, values in zip(present.nonzero()[:, 0].tolist(), logprobs, strict=True):
                first[row] = values
        scores = []
        for row, ids in enumerate(rest):
            own = [(keys[row : row + 1, :, : shared + len(ids)], values[row : row + 1, :, : shared + len(ids)])
                   for keys, values in kv]
            scores.append(self._score_candidates(own, shared + len(ids), encoded[row], candidates[row], first[row], deadline))
        self._kv, self._cached = own, list(prompt_ids[-1])  # the last prompt's cache, for the next call's prefix
        return scores

    def _score_candidates(self, kv: list[tuple], prompt_len: int, encoded: list[list[int]], options: Sequence[str],
                          first, deadline: float | None) -> dict[str, float]:
        """The candidates' log-probabilities after a prompt whose keys and values are `kv` (batch 1) and whose next
        token's log-probabilities are `first`: every candidate token but the last is context for the next, so those
        run as one right-padded batch."""
        torch = self._torch
        scores = first[torch.tensor([ids[0] for ids in encoded], device=first.device)].double().tolist()
        width = max(len(ids) for ids in encoded) - 1
        if width:
            self.check_deadline(deadline)
            rows = len(encoded)
            inputs, mask = self._right_padded([ids[:-1] for ids in encoded], prompt_len)
            cache = self._cache(kv, rows)
            wanted = mask[:, prompt_len:].bool()  # the positions whose next-token distributions are needed
            logprobs = self._forward(inputs.to(self._device), cache, attention_mask=mask.to(self._device), rows=wanted)
            targets = torch.tensor([token for ids in encoded for token in ids[1:]], device=logprobs.device)
            picked = logprobs.gather(-1, targets[:, None])[:, 0].double().tolist()
            offset = 0
            for row, ids in enumerate(encoded):
                scores[row] += sum(picked[offset : offset + len(ids) - 1])
                offset += len(ids) - 1
            self.stats.computed_tokens += rows * width  # padding included: the layers evaluate it too
        self.stats.candidate_tokens += sum(map(len, encoded))
        return dict(zip(options, scores, strict=True))

    def _right_padded(self, sequences: list[list[int]], past: int):
        """Token rows right-padded to the longest, and the attention mask over the `past` cached positions (all
        attended) and each row's own tokens (not its padding)."""
        torch = self._torch
        width = max(map(len, sequences))
        inputs = torch.full((len(sequences), width), self._pad, dtype=torch.long)
        mask = torch.zeros((len(sequences), past + width), dtype=torch.long)
        mask[:, :past] = 1
        for row, ids in enumerate(sequences):
            inputs[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[row, past : past + len(ids)] = 1
        return inputs, mask

    def _cache(self, kv: list[tuple], rows: int = 1):
        """A cache holding `kv` (per layer, keys and values), batch-1 ones seen as `rows` rows: views set once the cache
        is built (building it copies what it is given), so the forward's concatenation makes the one copy per row."""
        cache = self._cache_class(ddp_cache_data=kv) if kv else self._cache_class()
        if rows > 1:
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1)
        return cache

    def _forward(self, input_ids, cache, *, rows=None, **kwargs):
        """Log-probabilities of the next token after each position (only at the positions `rows` marks, flattened,
        if given: the output layer then runs on those alone, not on padding) and `cache` extended by `input_ids`."""
        head, handle = self._model.get_output_embeddings(), None
        if rows is not None:  # hidden states [batch, length, dim] -> [positions wanted, dim], before the output layer
            handle = head.register_forward_pre_hook(lambda module, args: (args[0][rows.to(args[0].device)], *args[1:]))
        try:
            logits = self._model(input_ids=input_ids, use_cache=True, **{self._cache_keyword: cache}, **kwargs).logits
        except (RuntimeError, ValueError) as error:
            raise EngineError(f"transformers failed to evaluate the prompt: {error}") from error
        finally:
            if handle is not None:
                handle.remove()
        # log_softmax, not logsumexp: on the CPU its fused kernel is several times faster over a large vocabulary.
        return self._torch.log_softmax(logits.float(), dim=-1)

    def _reset(self) -> None:
        self._kv, self._cached = [], []

    def close(self) -> None:
        self._kv, self._cached = [], []
        self._model = None
