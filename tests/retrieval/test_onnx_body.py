import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from labelcascade.file_hash import folder_sha256
from labelcascade.retrieval import SentenceTransformerEmbedder, load_embedder
from labelcascade.retrieval.embedders import DEFAULT_ID, default_model_dir
from labelcascade.retrieval.onnx_body import (
    GRAPH_FILE, PASS_OVERHEAD_TOKENS, SETTINGS_FILE, WEIGHTS_FILE, OnnxBodyEmbedder, forward_passes, write_onnx_graph,
)

from ..conftest import load_split


@pytest.fixture(scope="module")
def body(tmp_path_factory) -> Path:
    """The packaged all-MiniLM-L6-v2 (a body tune_body could have saved) with its onnxruntime graph written."""
    folder = Path(shutil.copytree(default_model_dir(), tmp_path_factory.mktemp("onnx") / "body"))
    assert write_onnx_graph(folder)
    return folder


def test_the_graph_holds_no_weights_and_points_each_one_into_the_bodys_safetensors(body):
    assert (body / GRAPH_FILE).stat().st_size < 1 << 20  # the weights (90 MB) are not copied
    graph = onnx.load(str(body / GRAPH_FILE), load_external_data=False)
    big = [tensor for tensor in graph.graph.initializer if np.prod(tensor.dims) >= 1024]
    assert len(big) >= 6 * 6  # six layers of query, key, value, output, intermediate and output matrices at least
    for tensor in big:
        assert tensor.data_location == onnx.TensorProto.EXTERNAL
        assert {entry.key: entry.value for entry in tensor.external_data}["location"] == WEIGHTS_FILE
    settings = json.loads((body / SETTINGS_FILE).read_text())
    assert settings["dim"] == 384 and settings["max_seq_length"] == 256 and "token_type_ids" in settings["inputs"]


def test_onnxruntime_embeds_what_torch_embeds_one_text_or_many(body):
    texts = [row["text"] for name in ("sst2", "ag_news", "trec") for row in load_split(name, "test")[:30]]
    texts += ["", "  spaces around  ", "word " * 600]  # empty, untrimmed, longer than the 256-token cut
    onnx_body, torch_body = OnnxBodyEmbedder(body, name="x"), SentenceTransformerEmbedder(body)
    expected = torch_body.embed(texts)
    batched = onnx_body.embed(texts, batch_size=16)
    single = np.vstack([onnx_body.embed([text]) for text in texts[::7]])
    assert batched.dtype == np.float32 and batched.shape == expected.shape
    assert np.abs(batched - expected).max() < 1e-5
    assert np.abs(single - expected[::7]).max() < 1e-5


def test_forward_passes_give_a_wide_text_a_pass_of_its_own_rather_than_pad_the_others_to_it():
    def cost(widths, passes):
        return sum(PASS_OVERHEAD_TOKENS + (cut.stop - cut.start) * widths[cut.start] for cut in passes)

    assert forward_passes(np.array([60, 14, 13, 12, 12, 11, 10, 9]), 32) == [slice(0, 1), slice(1, 8)]
    assert forward_passes(np.array([12] * 70), 32) == [slice(0, 6), slice(6, 38), slice(38, 70)]  # as 32 at a time: 3
    assert forward_passes(np.array([], dtype=int), 32) == []
    rng = np.random.default_rng(0)
    for _ in range(200):
        widths = np.sort(rng.integers(3, 90, size=int(rng.integers(1, 70))))[::-1]
        batch_size = int(rng.integers(1, 40))
        passes = forward_passes(widths, batch_size)
        assert [cut.start for cut in passes] == [0, *(cut.stop for cut in passes[:-1])]
        assert passes[-1].stop == len(widths)
        assert all(0 < cut.stop - cut.start <= batch_size for cut in passes)
        fixed = [slice(start, min(start + batch_size, len(widths))) for start in range(0, len(widths), batch_size)]
        assert cost(widths, passes) <= cost(widths, fixed)


def test_a_tuned_body_with_a_graph_loads_on_onnxruntime_under_the_same_id_and_digest_rules(body, tmp_path):
    copy = Path(shutil.copytree(body, tmp_path / "body"))
    digest = folder_sha256(copy)
    loaded = load_embedder(f"tuned:{copy}#{digest}")
    assert isinstance(loaded, OnnxBodyEmbedder) and loaded.id == f"sentence-transformers:tuned-{digest[:12]}"
    (copy / GRAPH_FILE).write_bytes((copy / GRAPH_FILE).read_bytes() + b"\0")  # the graph is checked too
    with pytest.raises(ValueError, match="do not match the sha256 recorded when it was tuned"):
        load_embedder(f"tuned:{copy}#{digest}")
    (copy / GRAPH_FILE).unlink()
    (copy / SETTINGS_FILE).unlink()  # a body tuned before graphs were written: torch answers it
    assert isinstance(load_embedder(f"tuned:{copy}#{folder_sha256(copy)}"), SentenceTransformerEmbedder)


def test_a_body_this_runtime_cannot_reproduce_gets_no_graph_and_stays_in_torch(tmp_path, caplog):
    folder = Path(shutil.copytree(default_model_dir(), tmp_path / "body"))
    pooling = folder / "1_Pooling" / "config.json"
    config = json.loads(pooling.read_text())
    config.update({key: False for key in config if key.startswith("pooling_mode_")}, pooling_mode_cls_token=True)
    pooling.write_text(json.dumps(config))
    with caplog.at_level("INFO", logger="labelcascade.retrieval.onnx_body"):
        assert not write_onnx_graph(folder)
    assert "answers in torch" in caplog.text
    assert not (folder / GRAPH_FILE).exists() and not (folder / SETTINGS_FILE).exists()


def test_the_packaged_body_answers_on_onnxruntime_from_a_graph_made_once_and_checked_on_every_load(tmp_path,
                                                                                                   monkeypatch):
    monkeypatch.setenv("LABELCASCADE_MODELS", str(tmp_path / "models"))
    texts = [row["text"] for row in load_split("banking77", "test")[:40]] + ["", "word " * 600]
    loaded = load_embedder("default")
    assert isinstance(loaded, OnnxBodyEmbedder) and loaded.id == DEFAULT_ID  # one id: old stores stay valid
    torch_body = SentenceTransformerEmbedder(default_model_dir(), name="all-MiniLM-L6-v2")
    expected = torch_body.embed(texts)
    assert np.abs(loaded.embed(texts) - expected).max() < 1e-5
    (folder,) = [path for path in (tmp_path / "models").iterdir() if path.is_dir()]
    assert folder.name.startswith("all-MiniLM-L6-v2-onnx-") and (folder / GRAPH_FILE).stat().st_size < 1 << 20
    made = (folder / GRAPH_FILE).stat().st_mtime_ns
    assert isinstance(load_embedder("default"), OnnxBodyEmbedder)
    assert (folder / GRAPH_FILE).stat().st_mtime_ns == made  # reused, not exported again
    (folder / GRAPH_FILE).write_bytes((folder / GRAPH_FILE).read_bytes()[:-100])  # cut short after it was made
    again = load_embedder("default")
    assert isinstance(again, OnnxBodyEmbedder) and (folder / GRAPH_FILE).stat().st_mtime_ns != made  # made again
    assert np.abs(again.embed(texts) - expected).max() < 1e-5


def test_the_packaged_body_stays_in_torch_with_a_warning_when_its_graph_cannot_be_written(tmp_path, monkeypatch,
                                                                                        caplog):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("LABELCASCADE_MODELS", str(tmp_path / "a-file" / "models"))
    with caplog.at_level("WARNING", logger="labelcascade.retrieval.onnx_body"):
        loaded = load_embedder("default")
    assert isinstance(loaded, SentenceTransformerEmbedder) and loaded.id == DEFAULT_ID
    assert "answers in torch" in caplog.text and "LABELCASCADE_MODELS" in caplog.text


@pytest.mark.slow  # two interpreters that each load the body, one of them exporting it
def test_processes_loading_the_packaged_body_at_once_export_its_graph_once(tmp_path):
    code = ("import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout); "
            "from labelcascade.retrieval import load_embedder; print(type(load_embedder('default')).__name__)")
    environment = {**os.environ, "LABELCASCADE_MODELS": str(tmp_path / "models")}
    started = [subprocess.Popen([sys.executable, "-c", code], env=environment, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True) for _ in range(2)]
    outputs = [process.communicate(timeout=300)[0] for process in started]
    assert all(output.strip().endswith("OnnxBodyEmbedder") for output in outputs), outputs
    assert sum(output.count("exporting all-MiniLM-L6-v2 to onnxruntime once") for output in outputs) == 1
    assert len([path for path in (tmp_path / "models").iterdir() if path.is_dir()]) == 1  # no scratch left behind
