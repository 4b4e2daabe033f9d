"""The engine slot: an engine that cannot be reached fails fast for a while, then is tried again."""

import socket
import time

import pytest

from labelcascade.agent import EngineSlot
from labelcascade.agent.engines import EngineError


def unreachable_spec() -> str:
    with socket.socket() as sock:  # a real closed port, not a mock
        sock.bind(("127.0.0.1", 0))
        return f"vllm:http://127.0.0.1:{sock.getsockname()[1]}/v1#model"


def test_a_failing_engine_is_set_aside_then_retried():
    slot = EngineSlot(unreachable_spec(), retry_after_s=0.5)
    with pytest.raises(EngineError, match="could not be loaded"):
        slot.get()
    started = time.perf_counter()
    with pytest.raises(EngineError, match="failed 0 s ago"):
        slot.get()
    assert time.perf_counter() - started < 0.1
    time.sleep(0.6)
    with pytest.raises(EngineError, match="could not be loaded"):  # tried again once the pause is over
        slot.get()
    assert slot.loaded is None
