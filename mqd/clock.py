"""Injectable time, so queue logic never calls time.time() directly (STYLE.md).

Queue state uses wall-clock milliseconds because due times and deadlines are
persisted and must mean the same thing after a restart.
"""

from __future__ import annotations

import time


class SystemClock:
    """Wall-clock milliseconds since the Unix epoch."""

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000


class ManualClock:
    """A clock that moves only when a test says so."""

    def __init__(self, start_ms: int = 1_700_000_000_000) -> None:
        self._now_ms = start_ms

    def now_ms(self) -> int:
        return self._now_ms

    def advance(self, delta_ms: int) -> None:
        assert delta_ms >= 0, "time does not go backwards"
        self._now_ms += delta_ms
