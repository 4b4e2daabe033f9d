"""Texts as two plain arrays for an .npz file, loaded without pickle.

A leaf module, like file_hash.py: the fallback's n-grams (fallback/text_features.py) and the calibrated dev set's
texts (agent/calibration.py) are both saved this way.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def packed_texts(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Their UTF-8 bytes one after another, and where each one ends. Not a unicode array: numpy sizes every cell of
    one by the longest text, so a single megabyte-long text among a thousand would take gigabytes."""
    encoded = [text.encode("utf-8") for text in texts]
    return np.frombuffer(b"".join(encoded), dtype=np.uint8), np.cumsum([len(e) for e in encoded], dtype=np.int64)


def unpacked_texts(data: np.ndarray, ends: np.ndarray) -> list[str]:
    """The texts `packed_texts` made the arrays from; ValueError when they cannot be (damaged arrays)."""
    if data.dtype != np.uint8 or data.ndim != 1 or ends.ndim != 1 or (len(ends) and (
            ends[-1] != len(data) or np.any(np.diff(ends) < 0) or ends[0] < 0)):
        raise ValueError("packed texts whose ends do not fit their bytes")
    blob, starts = data.tobytes(), np.r_[0, ends[:-1]] if len(ends) else []
    return [blob[start:end].decode("utf-8") for start, end in zip(starts, ends, strict=True)]
