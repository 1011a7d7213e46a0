"""One WatchRollout stream: the current state, then every event in order, no gaps.

Subscribe first, then read the snapshot (which names its last event number S): nothing
committed after S can be missed, it is either queued or in the history. Events arrive
from the bus; any gap in the numbering (a lost wake-up, a lagging queue) is filled from
the stored history. The stream ends after the event that made the rollout terminal.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass

from controlplane.domain.model.rollouts import Rollout, RolloutEvent, RolloutView
from controlplane.domain.ports import Store
from controlplane.domain.rollouts.bus import RolloutBus, RolloutUpdate

# How long a quiet watch waits before looking at the history itself: a safety net only,
# the poller delivers every change within about a second.
IDLE_CHECK = 15.0
HISTORY_BATCH = 500


@dataclass(frozen=True, slots=True)
class WatchBatch:
    rollout: Rollout
    events: tuple[RolloutEvent, ...]


Snapshot = Callable[[], Awaitable[RolloutView]]
History = Callable[[int], Awaitable[tuple[Rollout, list[RolloutEvent]]]]


async def watch(
    bus: RolloutBus, rollout_id: str, snapshot: Snapshot, history: History
) -> AsyncGenerator[RolloutView | WatchBatch, None]:
    sub = bus.subscribe(rollout_id)
    try:
        view = await snapshot()
        yield view
        rollout, last = view.rollout, view.rollout.event_seq
        behind = False
        while rollout.active or last < rollout.event_seq:
            # Lagging: the bus emptied the queue when it overflowed, so no update may come
            # for a while (the rollout's last burst): go to the history at once.
            update = None if behind or sub.lagging else await sub.next(IDLE_CHECK)
            events: list[RolloutEvent] = []
            if update is not None and not sub.lagging:
                if update.rollout.version >= rollout.version:
                    rollout = update.rollout
                events = [e for e in update.events if e.seq > last]
                gap = bool(events) and events[0].seq != last + 1
            else:
                # A quiet spell, an overflow, or more history to read: ask the history.
                gap = True
            if gap:
                sub.lagging = False
                rollout, events = await history(last)
                behind = len(events) >= HISTORY_BATCH
            events = [e for e in events if e.seq > last]
            if events:
                last = events[-1].seq
                yield WatchBatch(rollout, tuple(events))
    finally:
        sub.close()


async def feed_bus(store: Store, bus: RolloutBus) -> int:
    """Publish what was committed (on any replica) to rollouts watched here: one query
    for all of them, and the new events of those that moved. Returns rollouts fed."""
    watched = bus.watched()
    if not watched:
        return 0
    # One snapshot: a rollout read before another replica's commit and its events read
    # after it would pair the old state with the new events, and a watch would end on
    # that old state (RUNNING) once the events show it finished.
    async with store.snapshot() as tx:
        seqs = await tx.rollouts.event_seqs(list(watched))
        fed = 0
        for rollout_id, seq in seqs.items():
            if seq <= watched[rollout_id]:
                continue
            rollout = await tx.rollouts.get(rollout_id)
            events = await tx.rollouts.events(rollout_id, watched[rollout_id], HISTORY_BATCH)
            if rollout is not None and events:
                bus.publish(RolloutUpdate(rollout, tuple(events)))
                fed += 1
    return fed
