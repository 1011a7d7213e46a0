"""A clock tests jump forward: time-driven rules (bakes, leases, offline detection,
retention, schedules, expiries) are tested by moving it, not by waiting. Between jumps it
runs at the real pace, so rules that need time to pass at all (a heartbeat after an
activation) see it pass."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta


class TestClock:
    __test__ = False  # not a test class, whatever pytest thinks of its name

    def __init__(self) -> None:
        self._offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self._offset

    def monotonic(self) -> float:
        """`time.monotonic` moved by the same jumps: for what measures its own deadlines
        (a lease holder's `Leases.monotonic`)."""
        return time.monotonic() + self._offset.total_seconds()

    def advance(self, by: timedelta | float) -> datetime:
        self._offset += by if isinstance(by, timedelta) else timedelta(seconds=by)
        return self()
