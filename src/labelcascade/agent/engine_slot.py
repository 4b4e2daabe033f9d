"""The cascade's hold on its LLM engine: loaded on first need, set aside for a while after it fails.

An engine that cannot be loaded or that fails a call (server down, timeout) must never fail a classification:
the cascade answers from the fallback, marked `degraded`. To keep those answers fast while the engine is down,
the slot refuses calls for `retry_after_s` seconds after a failure, then tries again, so a job returns to the LLM
on its own once the server is back. A timeout alone is not taken for an engine that is down (a loaded machine is
slow, not broken): only a second timeout in a row sets it aside, so one slow batch does not degrade the batches
after it.
"""

from __future__ import annotations

import time

from labelcascade.agent.engines import Engine, EngineError, EngineTimeout, load_engine

TIMEOUTS_TO_SET_ASIDE = 2  # timeouts in a row that set the engine aside like any other failure


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
        self._timeouts = 0  # in a row, since the engine last answered

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
        """Record a failure: calls are refused until `retry_after_s` has passed (for a timeout, only once
        TIMEOUTS_TO_SET_ASIDE have come in a row)."""
        self._failure = str(error)
        if isinstance(error, EngineTimeout):
            self._timeouts += 1
            if self._timeouts < TIMEOUTS_TO_SET_ASIDE:
                return
        self._failed_at = time.monotonic()

    def answered(self) -> None:
        """Record that the engine answered: the timeouts in a row start again from none."""
        self._timeouts = 0

    @property
    def last_failure(self) -> str | None:
        """Why the engine last failed to load or answer, or None if it never has."""
        return self._failure or None

    @property
    def loaded(self) -> Engine | None:
        return self._engine

    def close(self) -> None:
        """Close the engine if the slot loaded it; an engine handed in stays open for its owner."""
        if self._engine is not None and self._owned:
            self._engine.close()
            self._engine = None
