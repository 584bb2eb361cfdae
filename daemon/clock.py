"""Wall-clock time that moves with trio's clock.

Schedules are stored as wall-clock timestamps (seconds since the epoch) so that they survive
a restart, while layers sleep on trio's clock. Deriving one from the other keeps a single
source of time: under ``trio.testing.MockClock`` an hour of schedules passes in milliseconds,
and in production trio's clock follows the monotonic clock.
"""

from __future__ import annotations

import time

import trio


class Clock:
    """``now()`` in epoch seconds, anchored to the wall clock on first use inside trio."""

    def __init__(self) -> None:
        self._offset: float | None = None

    def now(self) -> float:
        current = trio.current_time()
        if self._offset is None:
            self._offset = time.time() - current
        return current + self._offset
