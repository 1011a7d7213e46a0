"""In-process fan-out of rollout events to watchers (WatchRollout).

Whoever commits a rollout change in this process publishes it after commit; a poller
(one query per process per second for every watched rollout together, `tasks/`)
publishes what other replicas committed. Publishing never awaits a watcher: each has a
small bounded queue, and a watcher that overflows is marked lagging and catches up
from the stored event history, which has every event numbered without gaps.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from controlplane.domain.model.rollouts import Rollout, RolloutEvent

# Updates queued per watcher; a CLI reading its terminal never needs more. Past it the
# watcher re-reads the history instead of holding the publisher up.
QUEUE_SIZE = 256


@dataclass(frozen=True, slots=True)
class RolloutUpdate:
    """Events of one commit and the rollout as that commit left it."""

    rollout: Rollout
    events: tuple[RolloutEvent, ...]


class Subscription:
    def __init__(self, bus: RolloutBus, rollout_id: str):
        self.rollout_id = rollout_id
        self.lagging = False
        self._bus = bus
        self._queue: asyncio.Queue[RolloutUpdate] = asyncio.Queue(QUEUE_SIZE)

    def offer(self, update: RolloutUpdate) -> None:
        try:
            self._queue.put_nowait(update)
        except asyncio.QueueFull:
            self.lagging = True
            while not self._queue.empty():
                self._queue.get_nowait()

    async def next(self, wait: float) -> RolloutUpdate | None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                return await self._queue.get()
        return None

    def close(self) -> None:
        self._bus.unsubscribe(self)


class RolloutBus:
    def __init__(self) -> None:
        self._subs: dict[str, set[Subscription]] = {}
        # The highest event number published per watched rollout.
        self._published: dict[str, int] = {}

    def subscribe(self, rollout_id: str) -> Subscription:
        sub = Subscription(self, rollout_id)
        self._subs.setdefault(rollout_id, set()).add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.rollout_id)
        if subs is None:
            return
        subs.discard(sub)
        if not subs:
            del self._subs[sub.rollout_id]
            self._published.pop(sub.rollout_id, None)

    def watched(self) -> dict[str, int]:
        """Watched rollout id -> highest event number published here so far."""
        return {rid: self._published.get(rid, 0) for rid in self._subs}

    def publish(self, update: RolloutUpdate) -> None:
        rid = update.rollout.id
        subs = self._subs.get(rid)
        if not subs:
            return
        self._published[rid] = max(self._published.get(rid, 0), update.rollout.event_seq)
        for sub in list(subs):
            sub.offer(update)
