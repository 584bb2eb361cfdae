"""Wall-clock time for judging timestamps, trio's clock for intervals.

Schedules and webhook timestamps are wall-clock times (seconds since the epoch): schedules
survive a restart, and FAL signs its webhooks with its own wall clock. So ``now()`` reads the
wall clock at every call: when the system clock is stepped (NTP corrects a clock 10 minutes
behind), the very next judgement uses the corrected time. Intervals (sleeps, timeouts,
heartbeats) stay on trio's clock, which follows the monotonic clock and never steps.

Under a test clock (``trio.testing.MockClock``) wall time is derived from trio's clock
instead, anchored on first use, so that an hour of schedules passes in milliseconds.
``trio.testing`` is never imported here (it brings pytest along: 60 modules and their memory
in a daemon that needs none of them): a MockClock can only run where it was imported.
"""

from __future__ import annotations

import sys
import time

import trio


class Clock:
    """``now()`` in epoch seconds: the wall clock, or trio's test clock when one runs."""

    def __init__(self) -> None:
        self._offset: float | None = None

    def now(self) -> float:
        if not _mock_clock_runs():
            return time.time()
        current = trio.current_time()
        if self._offset is None:
            self._offset = time.time() - current
        return current + self._offset


def _mock_clock_runs() -> bool:
    testing = sys.modules.get("trio.testing")
    return testing is not None and isinstance(trio.lowlevel.current_clock(), testing.MockClock)
