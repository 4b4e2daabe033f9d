import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from labelcascade.file_hash import folder_sha256
from labelcascade.retrieval import SentenceTransformerEmbedder, load_embedder
from labelcascade.retrieval.embedders import default_model_dir
from labelcascade.retrieval.onnx_body import GRAPH_FILE, SETTINGS_FILE, WEIGHTS_FILE, OnnxBodyEmbedder, write_onnx_graph

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
