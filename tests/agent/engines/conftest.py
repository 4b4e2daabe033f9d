"""Real models for the engines' tests: a vLLM server started once per session from tools/vllm_server.sh, and the
Hugging Face checkpoint that `tools/vllm_server.sh setup` converts from the packaged GGUF."""

import os
import socket
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def vllm_url():
    """URL of a vLLM server on 127.0.0.1. Outside CI, skipped until `tools/vllm_server.sh setup` has been run."""
    if not (REPO / ".venv-vllm" / ".installed").is_file():
        message = "no .venv-vllm: run `tools/vllm_server.sh setup` (make test does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    port = free_port()
    script = REPO / "tools" / "vllm_server.sh"
    started = subprocess.run(["bash", str(script), "start", str(port)], capture_output=True, text=True, timeout=400)
    if started.returncode != 0:
        pytest.fail(f"the vLLM server did not start:\n{started.stdout}\n{started.stderr}")
    yield f"http://127.0.0.1:{port}/v1"
    subprocess.run(["bash", str(script), "stop", str(port)], timeout=60)


@pytest.fixture(scope="session")
def hf_model() -> Path:
    """Gemma 3 270M as a Hugging Face checkpoint (converted from the llama.cpp engine's GGUF, with <bos> fixed).
    Outside CI, skipped until `tools/vllm_server.sh setup` has made it."""
    path = REPO / ".cache" / "gemma3-270m-bf16"
    if not (path / "config.json").is_file():
        message = f"no {path}: run `tools/vllm_server.sh setup` (make test does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def transformers_engine(hf_model):
    """One transformers engine on that checkpoint (float32, CPU) for the session; loads in ~5 s."""
    from labelcascade.agent.engines import load_engine

    engine = load_engine(f"transformers:{hf_model}")
    yield engine
    engine.close()
