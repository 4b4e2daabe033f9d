"""LLM engines behind one protocol (`base.Engine`), chosen by a spec string.

    llamacpp:default            the packaged Gemma 3 270M GGUF, in-process (the embedded default)
    llamacpp:/path/model.gguf   any local GGUF model
    vllm:http://127.0.0.1:8000/v1#model   a vLLM OpenAI-compatible server (the model may be left out if it serves one)

Each backend is one small adapter module, imported only when its spec is used, so the optional extras a backend
needs are never required by the others.
"""

from labelcascade.agent.engines.base import Engine, EngineError, EngineStats, EngineTimeout, normalize

DEFAULT_ENGINE = "llamacpp:default"


def load_engine(spec: str = DEFAULT_ENGINE) -> Engine:
    """Build the engine a spec string names; see the module docstring for the forms."""
    scheme, _, target = spec.partition(":")
    if scheme == "llamacpp":
        from labelcascade.agent.engines.llamacpp import LlamaCppEngine

        return LlamaCppEngine(None if target in ("", "default") else target)
    if scheme == "vllm" and target:
        from labelcascade.agent.engines.vllm_server import VLLMServerEngine

        url, _, model = target.partition("#")
        return VLLMServerEngine(url, model or None)
    raise ValueError(
        f"unknown engine spec {spec!r}; supported: 'llamacpp:default', 'llamacpp:/path/model.gguf', "
        "'vllm:http://HOST:PORT/v1#MODEL'"
    )


__all__ = ["DEFAULT_ENGINE", "Engine", "EngineError", "EngineStats", "EngineTimeout", "load_engine", "normalize"]
