"""Real models for the engines' tests: the vLLM server that tests/conftest.py starts once per session, and the
Hugging Face checkpoint that `tools/vllm_server.sh setup` converts from the packaged GGUF."""

import os
import signal
import socket
import subprocess
from pathlib import Path

import math

import pytest

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "tools" / "vllm_server.sh"


def assert_log_probabilities(scores: dict[str, float], candidates: list[str]) -> None:
    """Scores of distinct continuations are log-probabilities: one per candidate, each finite and at most 0, and
    together at most 1 (the candidates are disjoint events: none is a prefix of another)."""
    assert set(scores) == set(candidates)
    assert all(math.isfinite(value) and value <= 0 for value in scores.values())
    assert 0 < sum(math.exp(value) for value in scores.values()) <= 1 + 1e-6


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def require_vllm() -> None:
    """Skip (fail in CI) until `tools/vllm_server.sh setup` has made .venv-vllm."""
    if not (REPO / ".venv-vllm" / ".installed").is_file():
        message = "no .venv-vllm: run `tools/vllm_server.sh setup` (make test does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


class VLLMServer:
    """A real vLLM server on 127.0.0.1:`port`, run by tools/vllm_server.sh. The fault tests kill it the way a crash
    would (SIGKILL to its whole process group: API server, engine core, worker) and start it again on the same port,
    so its clients must find it again at the same URL."""

    def __init__(self, port: int):
        self.port = port
        self.url = f"http://127.0.0.1:{port}/v1"
        self._pidfile = REPO / ".cache" / f"vllm-{port}.pid"

    def start(self) -> None:
        """Start and wait until healthy (~70 s on 2 cores); the script stops what it started if that fails."""
        started = subprocess.run(["bash", str(SCRIPT), "start", str(self.port)], capture_output=True, text=True,
                                 timeout=400)
        if started.returncode != 0:
            pytest.fail(f"the vLLM server did not start:\n{started.stdout}\n{started.stderr}")

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): it still accepts connections, as a hung server does, but never answers."""
        os.killpg(self._group(), signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self._group(), signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL the whole server, as a crash would."""
        os.killpg(self._group(), signal.SIGKILL)

    def stop(self) -> None:
        subprocess.run(["bash", str(SCRIPT), "stop", str(self.port)], timeout=60)

    def _group(self) -> int:
        return int(self._pidfile.read_text())  # the script starts the server with setsid: its pid is the group's id


@pytest.fixture(scope="module")
def vllm_url(vllm_server):
    return vllm_server.url


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
