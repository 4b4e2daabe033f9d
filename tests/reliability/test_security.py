"""Security basics: no pickle is ever loaded, model files are checked by sha256, servers bind 127.0.0.1 unless told,
an exposed server needs an API key, and request sizes are limited."""

from __future__ import annotations

import hashlib
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from labelcascade import Session
from labelcascade.agent.engines import EngineError, load_engine
from labelcascade.agent.engines.llamacpp import DEFAULT_MODEL_SHA256, LlamaCppEngine, check_model_file, default_model_path
from labelcascade.service import create_app, is_loopback

from ..conftest import BANKING_TASK
from ..test_service import running

SRC = Path(__file__).resolve().parents[2] / "src" / "labelcascade"
# Calls that can run code from a file: pickle and its wrappers, and numpy loads that allow pickles.
UNSAFE = re.compile(
    r"^\s*(import|from)\s+(pickle|_pickle|dill|joblib|cloudpickle|shelve)\b"
    r"|\b(pickle|dill|joblib|cloudpickle|shelve)\.(loads?|open)\(|torch\.load\(|allow_pickle\s*=\s*True"
)


def test_no_source_file_can_load_a_pickle():
    offending = [f"{path.relative_to(SRC)}:{number}: {line.strip()}"
                 for path in SRC.rglob("*.py") for number, line in enumerate(path.read_text().splitlines(), 1)
                 if UNSAFE.search(line)]
    loads = [f"{path.relative_to(SRC)}: np.load without allow_pickle=False"
             for path in SRC.rglob("*.py") for call in re.findall(r"np\.load\(.*", path.read_text())
             if "allow_pickle=False" not in call]
    assert offending == [] and loads == []


def test_a_workspace_whose_fallback_model_is_a_pickle_is_refused(embedder, tmp_path):
    """The pickle would run code when loaded (it calls `marker.touch` via pathlib); opening must refuse it unread."""
    workspace = tmp_path / "ws"
    Session.create(BANKING_TASK, workspace=workspace, embedder=embedder, engine=None).close()
    marker = tmp_path / "pickle-ran"
    [model] = (workspace / "fallback").glob("*.npz")

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    model.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(Exception) as error:  # noqa: PT011 - any refusal will do, as long as it says why
        Session.open(workspace, embedder=embedder, engine=None).classify("my card got stolen")
    assert not marker.exists()
    assert "Traceback" not in str(error.value) and str(error.value)


def test_the_default_model_is_checked_against_its_pinned_sha256():
    path = default_model_path()
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    assert digest.hexdigest() == DEFAULT_MODEL_SHA256


@pytest.fixture(scope="module")
def truncated_model(tmp_path_factory) -> Path:
    """The first 10 MB of the real GGUF: a download or copy cut short."""
    path = tmp_path_factory.mktemp("models") / "cut.gguf"
    with default_model_path().open("rb") as source, path.open("wb") as target:
        target.write(source.read(10_000_000))
    return path


def test_a_truncated_model_is_refused_by_its_sha256(truncated_model):
    with pytest.raises(EngineError, match=r"cut.gguf: sha256 [0-9a-f]{64} differs from the expected"):
        LlamaCppEngine(truncated_model, sha256=DEFAULT_MODEL_SHA256)
    with pytest.raises(EngineError, match="differs from the expected"):  # the spec form
        load_engine(f"llamacpp:{truncated_model}#sha256={DEFAULT_MODEL_SHA256}")


def test_a_truncated_model_without_a_sha256_is_an_engine_error_from_llama_cpp(truncated_model):
    with pytest.raises(EngineError, match="llama.cpp could not load the model"):
        LlamaCppEngine(truncated_model)


def test_a_pickle_or_other_file_named_gguf_is_refused_before_llama_cpp_reads_it(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    with pytest.raises(EngineError, match=r"not a GGUF model file \(it starts with b'\\x80"):
        LlamaCppEngine(fake)


def test_a_tampered_model_is_refused_even_after_an_earlier_check_passed(tmp_path):
    """The check is remembered by path, size and modification time: a changed file is hashed again."""
    model = tmp_path / "small.gguf"
    model.write_bytes(b"GGUF" + bytes(1000))
    good = hashlib.sha256(model.read_bytes()).hexdigest()
    check_model_file(model, good)
    time.sleep(0.01)
    model.write_bytes(b"GGUF" + bytes(999) + b"\x01")  # same size, one byte changed
    with pytest.raises(EngineError, match="differs from the expected"):
        check_model_file(model, good)


def test_checking_the_default_model_costs_one_hash_per_process():
    """Measured: hashing 253 MB is ~0.2-0.3 s on 2 cores; the second load of the same file skips it."""
    from labelcascade import file_hash

    file_hash._known.clear()
    start = time.perf_counter()
    default_model_path()
    first = time.perf_counter() - start
    start = time.perf_counter()
    default_model_path()
    again = time.perf_counter() - start
    print(f"\nsha256 check of the default model: first {first * 1000:.0f} ms, again {again * 1000:.1f} ms")
    assert again < first / 10


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                                ("127.0.0.2", True), ("0.0.0.0", False), ("::", False),
                                                ("192.168.1.5", False), ("example.org", False)])
def test_only_loopback_hosts_count_as_this_machine(host, loopback):
    assert is_loopback(host) is loopback


def test_serving_beyond_this_machine_needs_an_api_key_or_an_explicit_flag(tmp_path):
    """`serve --host 0.0.0.0` without a key exits with a one-line error before it opens the workspace or binds."""
    script = Path(sys.executable).with_name("labelcascade")
    result = subprocess.run([str(script), "serve", str(tmp_path / "ws"), "--host", "0.0.0.0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "without an API key" in result.stderr and "--allow-no-key" in result.stderr
    assert "not a labelcascade workspace" not in result.stderr  # refused before anything else


def test_request_size_limits(banking):
    with running(create_app(banking, api_key="k", max_texts=8, max_text_chars=500, max_body_bytes=20_000)) as url:
        headers = {"Authorization": "Bearer k"}
        too_large = httpx.post(f"{url}/v1/classify", json={"text": "x" * 30_000}, headers=headers)
        too_many = httpx.post(f"{url}/v1/classify", json={"texts": ["hi"] * 9}, headers=headers)
        too_long = httpx.post(f"{url}/v1/classify", json={"text": "x" * 501}, headers=headers)
        no_key = httpx.post(f"{url}/v1/classify", json={"text": "x" * 30_000})
        fine = httpx.post(f"{url}/v1/classify", json={"texts": ["my card got stolen"] * 8}, headers=headers)
    assert too_large.status_code == 413
    assert too_many.status_code == 422 and "9 texts; at most 8" in too_many.text
    assert too_long.status_code == 422 and "501 characters; at most 500" in too_long.text
    assert no_key.status_code in (401, 413)  # neither answers without the key
    assert fine.status_code == 200 and len(fine.json()["answers"]) == 8

