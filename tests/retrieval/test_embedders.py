import numpy as np
import pytest

from labelcascade.retrieval import SentenceTransformerEmbedder, load_embedder
from labelcascade.retrieval.embedders import default_model_dir


def test_default_embedder_gives_unit_float32_vectors(embedder):
    vectors = embedder.embed(["where is my card?", "the match ended in a draw", ""])
    assert embedder.id == "sentence-transformers:all-MiniLM-L6-v2" and embedder.dim == 384
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_batched_and_single_embeddings_agree(embedder):
    texts = ["my card has not arrived", "How do I reset my PIN?", "exchange rate for euros today"]
    batched = embedder.embed(texts)
    single = np.vstack([embedder.embed([text]) for text in texts])
    assert np.allclose(batched, single, atol=1e-5)


def test_similar_meanings_are_closer_than_unrelated_ones(embedder):
    a, b, c = embedder.embed(["my card still hasn't arrived", "when will my new card be delivered?", "the stock market fell"])
    assert a @ b > a @ c + 0.2


def test_local_model_folder_loads_the_same_model(embedder):
    local = load_embedder(str(default_model_dir()))
    assert isinstance(local, SentenceTransformerEmbedder) and local.id == "sentence-transformers:model"
    text = ["hello there"]
    assert np.allclose(local.embed(text), embedder.embed(text), atol=1e-6)


def test_bad_specs_are_refused(tmp_path, embedder):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_embedder(str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="not a sentence-transformers model folder"):
        load_embedder(str(tmp_path))
    with pytest.raises(TypeError, match="wrap a single text"):
        embedder.embed("a bare string")
    assert load_embedder(embedder) is embedder


def test_the_id_a_workspace_records_loads_the_same_embedder(embedder):
    assert load_embedder(embedder.id).id == embedder.id
