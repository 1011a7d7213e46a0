"""One WatchRollout stream (`domain/rollouts/watch.py`) against a real `RolloutBus` and a
stored history: the snapshot first, then every event exactly once and in order however
updates arrive (repeated, overlapping, out of order, with gaps, or too many for the
watcher's queue), and the end after the event that made the rollout terminal."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from controlplane.domain.model.rollouts import Rollout, RolloutEvent, RolloutState, RolloutView
from controlplane.domain.rollouts.bus import QUEUE_SIZE, RolloutBus, RolloutUpdate
from controlplane.domain.rollouts.watch import WatchBatch, watch
from tests.support.rollouts import T0, make_run, make_spec, nodes


class Stored:
    """The stored history: the rollout as last committed and its numbered events."""

    def __init__(self) -> None:
        self.rollout: Rollout = replace(make_run(make_spec(), nodes(3)).rollout, state=RolloutState.RUNNING)
        self.events: list[RolloutEvent] = []
        self.reads = 0

    def commit(self, count: int = 1, state: RolloutState | None = None) -> RolloutUpdate:
        """`count` new events (and a new version), as `commit` stores them."""
        first = self.rollout.event_seq + 1
        self.rollout = replace(
            self.rollout,
            state=state or self.rollout.state,
            version=self.rollout.version + 1,
            event_seq=self.rollout.event_seq + count,
        )
        new = [
            RolloutEvent(self.rollout.id, seq, T0, "step", self.rollout.state, f"event {seq}")
            for seq in range(first, first + count)
        ]
        self.events += new
        return RolloutUpdate(self.rollout, tuple(new))

    async def snapshot(self) -> RolloutView:
        return RolloutView(self.rollout, ())

    async def history(self, after: int) -> tuple[Rollout, list[RolloutEvent]]:
        self.reads += 1
        return self.rollout, [e for e in self.events if e.seq > after][:500]


async def collect(stream, until_seq: int) -> list[int]:  # type: ignore[no-untyped-def]
    seqs: list[int] = []
    async for item in stream:
        if isinstance(item, WatchBatch):
            seqs += [e.seq for e in item.events]
        if seqs and seqs[-1] >= until_seq:
            break
    return seqs


async def test_each_event_once_in_order_however_updates_arrive() -> None:
    bus, stored = RolloutBus(), Stored()
    stored.commit(2)  # before the watch: in the snapshot's count, not sent again
    stream = watch(bus, stored.rollout.id, stored.snapshot, stored.history)
    first = await anext(stream)
    assert isinstance(first, RolloutView) and first.rollout.event_seq == 2
    a, b, c = stored.commit(2), stored.commit(1), stored.commit(3)
    for update in (a, a, c, b, c):  # repeated, and c before b: a gap the history fills
        bus.publish(update)
    assert await collect(stream, 8) == [3, 4, 5, 6, 7, 8]
    await stream.aclose()


async def test_an_overflowed_watcher_catches_up_without_waiting_for_another_change() -> None:
    bus, stored = RolloutBus(), Stored()
    stream = watch(bus, stored.rollout.id, stored.snapshot, stored.history)
    await anext(stream)
    # One update more than the queue holds, then silence (the rollout's last burst).
    for _ in range(QUEUE_SIZE + 1):
        bus.publish(stored.commit())
    reads = stored.reads
    task = asyncio.ensure_future(anext(stream))
    for _ in range(20):
        await asyncio.sleep(0)  # no I/O anywhere: only the stream's own steps run
    assert task.done(), "the watcher waits for another change instead of reading the history"
    batch = task.result()
    assert isinstance(batch, WatchBatch) and stored.reads == reads + 1
    assert [e.seq for e in batch.events] == list(range(1, QUEUE_SIZE + 2))
    await stream.aclose()


async def test_the_stream_ends_after_the_terminal_event() -> None:
    bus, stored = RolloutBus(), Stored()
    stream = watch(bus, stored.rollout.id, stored.snapshot, stored.history)
    await anext(stream)
    bus.publish(stored.commit(1))
    bus.publish(stored.commit(1, state=RolloutState.SUCCEEDED))
    items = [item async for item in stream]
    assert [e.seq for item in items if isinstance(item, WatchBatch) for e in item.events] == [1, 2]
    assert bus.watched() == {}  # unsubscribed
