"""The fault suite's one switch: CI runs each fault at a size that keeps the suite fast; on-purpose runs set
LABELCASCADE_RELIABILITY=long for the full sizes (see RELIABILITY.md for the commands)."""

from __future__ import annotations

import os

LONG = os.environ.get("LABELCASCADE_RELIABILITY", "").lower() == "long"


def scaled(short: int, long: int) -> int:
    """`long` in an on-purpose run, `short` in CI."""
    return long if LONG else short
