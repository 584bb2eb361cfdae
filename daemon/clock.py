"""Wall-clock time for judging timestamps, trio's clock for intervals.

Schedules and webhook timestamps are wall-clock times (seconds since the epoch): schedules
survive a restart, and FAL signs its webhooks with its own wall clock. So ``now()`` reads the
wall clock at every call: when the system clock is stepped (NTP corrects a clock 10 minutes
behind), the very next judgement uses the corrected time. Intervals (sleeps, timeouts,
heartbeats) stay on trio's clock, which follows the monotonic clock and never steps.

Under a test clock (``trio.testing.MockClock``) wall time is derived from trio's clock
instead, anchored on first use, so that an hour of schedules passes in milliseconds.
"""

from __future__ import annotations

import time

import trio
from trio.testing import MockClock


class Clock:
    """``now()`` in epoch seconds: the wall clock, or trio's test clock when one runs."""

    def __init__(self) -> None:
        self._offset: float | None = None

    def now(self) -> float:
        if not isinstance(trio.lowlevel.current_clock(), MockClock):
            return time.time()
        current = trio.current_time()
        if self._offset is None:
            self._offset = time.time() - current
        return current + self._offset
