"""The cascade's hold on its LLM engine: loaded on first need, set aside for a while after it fails.

An engine that cannot be loaded or that fails a call (server down, timeout) must never fail a classification:
the cascade answers from the fallback, marked `degraded`. To keep those answers fast while the engine is down,
the slot refuses calls for `retry_after_s` seconds after a failure, then tries again, so a job returns to the LLM
on its own once the server is back.
"""

from __future__ import annotations

import time

from labelcascade.agent.engines import Engine, EngineError, load_engine


class EngineSlot:
    """Holds an engine, or the spec to load one, and the time of its last failure."""

    def __init__(self, engine: str | Engine, *, retry_after_s: float = 10.0):
        """`engine` is a spec to load when first needed (and close with the slot), or an engine the caller owns."""
        self._engine: Engine | None = None if isinstance(engine, str) else engine
        self._owned = isinstance(engine, str)
        self.spec = engine if isinstance(engine, str) else engine.spec
        self.retry_after_s = retry_after_s
        self._failed_at: float | None = None
        self._failure = ""

    def get(self) -> Engine:
        """The engine, loading it if needed; EngineError while it is failing (within `retry_after_s`)."""
        if self._failed_at is not None and time.monotonic() - self._failed_at < self.retry_after_s:
            raise EngineError(f"engine {self.spec} failed {time.monotonic() - self._failed_at:.0f} s ago: {self._failure}")
        if self._engine is None:
            try:
                self._engine = load_engine(self.spec)
            except Exception as error:  # noqa: BLE001 - whatever stops the engine from loading degrades, never raises
                self.failed(error)
                raise EngineError(f"engine {self.spec} could not be loaded: {error}") from error
        self._failed_at = None
        return self._engine

    def failed(self, error: BaseException) -> None:
        """Record a failure: calls are refused until `retry_after_s` has passed."""
        self._failed_at, self._failure = time.monotonic(), str(error)

    @property
    def loaded(self) -> Engine | None:
        return self._engine

    def close(self) -> None:
        """Close the engine if the slot loaded it; an engine handed in stays open for its owner."""
        if self._engine is not None and self._owned:
            self._engine.close()
            self._engine = None
