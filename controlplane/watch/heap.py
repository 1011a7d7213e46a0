"""When to freeze the heap, and how to do it without leaking.

Thousands of long-lived stream objects make every full collection rescan them for
nothing; `gc.freeze()` moves them out of the collector's sight (grpc-aio-limits.md §3:
the larger half of the send cost). It is done once a burst of opens and closes has
settled, so a storm is frozen once rather than on every open. Frozen objects are never
collected, so each settle first thaws: garbage among them (streams that ended since the
last freeze, caught in a reference cycle) is freed then instead of staying forever.
"""

from __future__ import annotations

import gc


class HeapSettler:
    def __init__(self, settle: float, refreeze_after: float, now: float):
        # Quiet this long after the last open or close: settle.
        self._settle = settle
        # Churn that never quiets down: settle at least this often anyway.
        self._refreeze_after = refreeze_after
        self._churn = 0
        self._last_churn = 0.0
        self._frozen_at = now

    def churned(self, now: float) -> None:
        """A stream opened or ended."""
        self._churn += 1
        self._last_churn = now

    def tick(self, now: float) -> None:
        if self._churn and (
            now - self._last_churn > self._settle or now - self._frozen_at > self._refreeze_after
        ):
            self.settle(now)

    def settle(self, now: float) -> None:
        """Thaw, collect, and freeze what is left."""
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        self._churn = 0
        self._frozen_at = now
