"""The prompt a sentence-transformers body puts before every text it embeds.

E5 bodies embed "query: " + text (the multilingual tuned body is saved with it as its default prompt). Code that
counts a body's tokens, trains it, or embeds outside sentence-transformers' `encode` (tuning in fallback/, the
onnxruntime graph in retrieval/, the SetFit benchmark) must add the same prompt, or its vectors are not the body's
own. It lives here, below both fallback/ and retrieval/, which do not import each other.
"""

from __future__ import annotations


def default_prompt(body) -> str:
    """`body`'s default prompt (a `SentenceTransformer`'s `prompts[default_prompt_name]`), or "" when it has none."""
    return body.prompts.get(body.default_prompt_name or "", "")
