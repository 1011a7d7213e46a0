"""When to freeze the heap, and how to do it without leaking or stalling.

Thousands of long-lived stream objects make every full collection rescan them for
nothing; `gc.freeze()` moves them out of the collector's sight (docs/benchmarks.md:
the larger half of the send cost). It is done once a burst of opens and closes has
settled, so a storm is frozen once rather than on every open, and under churn that never
settles (stream lifetimes alone turn a large fleet over all the time) every
`refreeze_after` anyway.

A settle collects what is not frozen — the objects made since the last freeze, so its
cost follows the turnover, not the heap — then freezes. Frozen objects are never
collected, though: an ended stream caught in a reference cycle after it was frozen would
stay forever. Thawing first (a full collection) frees it, but is a pass over the whole
heap, and every settle used to thaw: under steady churn, one such stall of the event loop
every `refreeze_after`.

Measured by `bench/heap_settle.py`: 10,000 streams carrying 200 objects each (2.9-3.1M
tracked objects after churn; the review counted ~2M on a 10,000-node replica), on a
2-core AMD EPYC VM while other jobs loaded it (load 3.2-3.7, so read these as upper
bounds; medians of 5-7 runs). A settle that thaws: 0.66-1.3 s. One that does not: 0.44 s
with a third of the streams turned over since the last freeze (5 minutes of 10-20 minute
lifetimes), 0.10-0.12 s with a tenth to a fifteenth (about one minute of them).

So a settle thaws only when it has a reason to. Each ended stream is watched through a
weak reference; one that ended before the previous settle has had a whole period to be
freed, and if it is still alive once the unfrozen objects are collected, the heap is
thawed and collected in full (and that is logged: it means a cycle through the stream,
which nothing should make — see WatchStream.done — or a reference that keeps it). With no
such stream only a backstop thaws, every `thaw_after`, for garbage cycles that hold no
stream and so go unseen. (What a call leaves in cycles on the server, a few objects of
grpc's handler lookup, is garbage as soon as the handler is found: the collection before
each freeze takes it.)
"""

from __future__ import annotations

import gc
import logging
import weakref

log = logging.getLogger(__name__)


class HeapSettler:
    def __init__(self, settle: float, refreeze_after: float, thaw_after: float, now: float):
        # Quiet this long after the last open or close: settle.
        self._settle = settle
        # Churn that never quiets down: settle at least this often anyway.
        self._refreeze_after = refreeze_after
        # Thaw and collect in full at least this often, whatever the streams say.
        self._thaw_after = thaw_after
        self._churn = 0
        self._last_churn = 0.0
        self._frozen_at = now
        self._thawed_at = now
        # Streams that ended since the last settle, and those that ended before it.
        self._ended: list[weakref.ref[object]] = []
        self._ended_before: list[weakref.ref[object]] = []

    def opened(self, now: float) -> None:
        """A stream opened."""
        self._churned(now)

    def ended(self, stream: object, now: float) -> None:
        """A stream ended: it should be freed by the next settle."""
        self._ended.append(weakref.ref(stream))
        self._churned(now)

    def _churned(self, now: float) -> None:
        self._churn += 1
        self._last_churn = now

    def tick(self, now: float) -> None:
        # Streams that ended before the last settle are checked by the next one, even if
        # nothing opens or ends meanwhile: one more (cheap) settle a quiet period later.
        quiet = now - max(self._last_churn, self._frozen_at) > self._settle
        if (self._churn or self._ended_before) and (quiet or now - self._frozen_at > self._refreeze_after):
            self.settle(now)

    def settle(self, now: float) -> bool:
        """Collect what is not frozen, thaw and collect the rest if an ended stream was
        not freed (or the backstop is due), and freeze what is left. True if it thawed."""
        stuck = 0
        thaw = now - self._thawed_at >= self._thaw_after
        if not thaw:
            gc.collect()
            stuck = sum(1 for ref in self._ended_before if ref() is not None)
            thaw = stuck > 0
        if thaw:
            gc.unfreeze()
            gc.collect()
            self._thawed_at = now
            if stuck:
                leaked = sum(1 for ref in self._ended_before if ref() is not None)
                log.warning(
                    "%d ended stream(s) outlived a settle; thawed the heap: %d freed, %d still referenced",
                    stuck,
                    stuck - leaked,
                    leaked,
                )
        gc.freeze()
        # Still referenced after a full collection: a live reference, not a cycle, and
        # thawing again would not free it. Watch only what ended since.
        self._ended_before, self._ended = self._ended, []
        self._churn = 0
        self._frozen_at = now
        return thaw
