"""WatchHub against an in-memory feed, driven step by step."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from collections.abc import AsyncIterator, Callable

import pytest

from controlplane.api.watch.v1 import watch_pb2 as pb
from controlplane.domain.kernel.errors import Unauthenticated, Unavailable
from controlplane.domain.kernel.labels import Selector, node_key, selector_key
from controlplane.domain.model.desired import DesiredRow
from controlplane.watch import encoding
from controlplane.watch.hub import HubSettings, WatchHub
from controlplane.watch.stream import LEDGER_SIZE, MAX_PENDING, WatchStream
from tests.support.eventually import settle
from tests.support.memfeed import MemoryFeed
from tests.support.sinks import RecordingSink

SEL_PROD = selector_key("p", Selector.parse("env=prod"))
SEL_ALL = selector_key("p", Selector.parse("*"))


@pytest.fixture
async def feed() -> MemoryFeed:
    return MemoryFeed()


@pytest.fixture
async def hub(feed: MemoryFeed) -> AsyncIterator[WatchHub]:
    h = WatchHub(feed, HubSettings(bookmark_interval=5.0, lifetime_min=100.0, lifetime_max=100.0))
    await h.start(background=False)
    yield h
    await h.stop(grace=0.1)


Opener = Callable[..., tuple[WatchStream, RecordingSink]]


@pytest.fixture
def open_stream(hub: WatchHub) -> Opener:
    def open_(node_id: str, since: int = 0, epoch: str = "") -> tuple[WatchStream, RecordingSink]:
        sink = RecordingSink()
        return hub.open(node_id, since, epoch or hub.epoch, sink), sink

    return open_


async def test_bootstrap_is_started_desired_snapshot_end(
    feed: MemoryFeed, hub: WatchHub, open_stream: Opener
) -> None:
    feed.node("a", {"env": "prod"})
    feed.assign((SEL_PROD,), "d1")
    await hub.catch_up()
    _, sink = open_stream("a")
    await settle()
    assert sink.kinds() == ["started", "desired", "snapshot_end"]
    started, desired, end = sink.events
    assert started.started.mode == pb.STREAM_MODE_BOOTSTRAP
    assert desired.desired.digest == "d1"
    assert desired.desired.source == "env=prod"
    assert desired.desired.revision == end.snapshot_end.revision == hub.position == 2


async def test_selector_change_reaches_only_matching_streams(
    feed: MemoryFeed, hub: WatchHub, open_stream: Opener
) -> None:
    feed.node("a", {"env": "prod"})
    feed.node("b", {"env": "dev"})
    await hub.catch_up()
    (_, a), (_, b) = open_stream("a"), open_stream("b")
    await settle()
    feed.assign((SEL_PROD,), "d1")
    await hub.catch_up()
    await settle()
    assert [d.digest for d in a.of("desired")] == ["", "d1"]
    assert [d.digest for d in b.of("desired")] == [""]


async def test_node_assignment_reaches_only_that_node(
    feed: MemoryFeed, hub: WatchHub, open_stream: Opener
) -> None:
    feed.node("a", {})
    feed.node("b", {})
    await hub.catch_up()
    (_, a), (_, b) = open_stream("a"), open_stream("b")
    revision = feed.assign((node_key("b"),), "only-b")
    await hub.catch_up()
    await settle()
    assert [d.digest for d in a.of("desired")] == [""]
    assert [(d.digest, d.revision) for d in b.of("desired")][-1] == ("only-b", revision)


async def test_identical_event_is_encoded_once(
    feed: MemoryFeed, hub: WatchHub, open_stream: Opener, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(50):
        feed.node(f"n{i}", {"env": "prod"})
    await hub.catch_up()
    sinks = [open_stream(f"n{i}")[1] for i in range(50)]
    await settle()
    calls = 0
    real = encoding.desired

    def counting(revision: int, row: object) -> bytes:
        nonlocal calls
        calls += 1
        return real(revision, row)  # type: ignore[arg-type]

    monkeypatch.setattr(encoding, "desired", counting)
    feed.assign((SEL_ALL,), "fleet")
    await hub.catch_up()
    await settle()
    assert calls == 1
    assert all(s.of("desired")[-1].digest == "fleet" for s in sinks)


async def test_pin_wins_and_tombstone_falls_back(
    feed: MemoryFeed, hub: WatchHub, open_stream: Opener
) -> None:
    feed.node("a", {"env": "prod"})
    feed.assign((node_key("a"),), "pinned", pinned=True)
    await hub.catch_up()
    _, sink = open_stream("a")
    feed.assign((SEL_PROD,), "newer-fleet")  # higher revision, but the pin wins
    await hub.catch_up()
    await settle()
    assert [d.digest for d in sink.of("desired")] == ["pinned"]
    feed.unassign((node_key("a"),))  # unpin: the fleet assignment applies
    await hub.catch_up()
    await settle()
    assert [d.digest for d in sink.of("desired")] == ["pinned", "newer-fleet"]
    feed.unassign((SEL_PROD,))
    await hub.catch_up()
    await settle()
    assert [d.digest for d in sink.of("desired")][-1] == ""


async def test_relabel_reroutes_the_stream(feed: MemoryFeed, hub: WatchHub, open_stream: Opener) -> None:
    feed.node("a", {"env": "dev"})
    feed.assign((SEL_PROD,), "prod-bundle")
    await hub.catch_up()
    _, sink = open_stream("a")
    await settle()
    assert sink.of("desired")[-1].digest == ""
    feed.node("a", {"env": "prod"})
    await hub.catch_up()
    await settle()
    assert sink.of("desired")[-1].digest == "prod-bundle"
    feed.assign((SEL_PROD,), "prod-2")
    await hub.catch_up()
    await settle()
    assert sink.of("desired")[-1].digest == "prod-2"


async def test_resume_without_changes_sends_only_a_bookmark(
    feed: MemoryFeed, hub: WatchHub, open_stream: Opener
) -> None:
    feed.node("a", {})
    feed.assign((node_key("a"),), "d1")
    await hub.catch_up()
    stream, _first = open_stream("a")
    await settle()
    hub.close(stream)
    feed.assign((SEL_PROD,), "unrelated")
    await hub.catch_up()
    _, sink = open_stream("a", since=2)
    await settle()
    assert sink.kinds() == ["started", "bookmark"]
    assert sink.events[0].started.mode == pb.STREAM_MODE_RESUME
    assert sink.events[1].bookmark.revision == hub.position == 3


async def test_reset_reasons(feed: MemoryFeed, hub: WatchHub, open_stream: Opener) -> None:
    feed.node("a", {})
    await hub.catch_up()
    _, ahead = open_stream("a", since=99)
    _, other_epoch = open_stream("a", since=1, epoch="other")
    feed.floor = 5
    for _ in range(6):
        feed.assign((node_key("a"),), "x")
    await hub.catch_up()
    _, too_old = open_stream("a", since=2)
    await settle()
    assert ahead.events[1].reset.reason == pb.RESET_REASON_AHEAD_OF_HEAD
    assert other_epoch.events[1].reset.reason == pb.RESET_REASON_EPOCH_CHANGED
    assert too_old.events[1].reset.reason == pb.RESET_REASON_TOO_OLD
    for sink in (ahead, other_epoch, too_old):
        assert sink.kinds()[:4] == ["started", "reset", "desired", "snapshot_end"]


async def test_slow_consumer_lags_and_catches_up_alone(
    feed: MemoryFeed, hub: WatchHub, open_stream: Opener
) -> None:
    feed.node("slow", {"env": "prod"})
    feed.node("fast", {"env": "prod"})
    await hub.catch_up()
    slow_stream, slow = open_stream("slow")
    _, fast = open_stream("fast")
    await settle()
    slow.block()
    for i in range(MAX_PENDING + 5):
        feed.assign((SEL_PROD,), f"d{i}")
        await hub.catch_up()
        await settle()
    assert slow_stream.lagging
    # The fast stream got every change while the slow one was stuck.
    assert [d.digest for d in fast.of("desired")][1:] == [f"d{i}" for i in range(MAX_PENDING + 5)]
    slow.unblock()
    await settle()
    assert not slow_stream.lagging
    digests = [d.digest for d in slow.of("desired")]
    # The stuck write, then the latest state instead of the dropped backlog.
    assert digests[-1] == f"d{MAX_PENDING + 4}"
    assert len(digests) < MAX_PENDING
    assert slow.kinds()[-1] == "bookmark"
    assert slow.of("bookmark")[-1].revision == hub.position


async def test_bookmarks_go_to_idle_streams_on_schedule(
    feed: MemoryFeed, hub: WatchHub, open_stream: Opener
) -> None:
    feed.node("a", {})
    feed.node("b", {})
    await hub.catch_up()
    (_, a), (_, b) = open_stream("a"), open_stream("b")
    await settle()
    b.block()
    feed.assign((node_key("b"),), "x")  # b now has a write stuck in flight
    await hub.catch_up()
    await settle()
    now = time.monotonic()
    for second in range(int(now), int(now) + 10):
        hub.tick(second)
    await settle()
    assert a.of("bookmark"), "idle stream got no bookmark"
    assert a.of("bookmark")[-1].revision == hub.position
    b.unblock()
    await settle()
    assert b.of("bookmark") == []


async def test_lifetime_ends_stream_with_closing_bookmark(feed: MemoryFeed, open_stream: Opener) -> None:
    hub = WatchHub(feed, HubSettings(bookmark_interval=1.0, lifetime_min=0.0, lifetime_max=0.0))
    await hub.start(background=False)
    feed.node("a", {})
    await hub.catch_up()
    sink = RecordingSink()
    stream = hub.open("a", 0, hub.epoch, sink)
    await settle()
    start = time.monotonic()
    for second in range(int(start), int(start) + 4):
        hub.tick(second + 0.999)
    await settle()
    assert stream.done.done() and stream.done.result() is None
    last = sink.of("bookmark")[-1]
    assert last.closing and last.revision == hub.position
    await hub.stop(grace=0.1)


async def test_epoch_change_ends_streams_unavailable(
    feed: MemoryFeed, hub: WatchHub, open_stream: Opener
) -> None:
    feed.node("a", {})
    await hub.catch_up()
    stream, _ = open_stream("a")
    feed.epoch = "restored"
    await hub.catch_up()
    assert isinstance(stream.done.result(), Unavailable)
    assert hub.epoch == "restored"


async def test_floor_past_position_rebuilds_and_resolves(
    feed: MemoryFeed, hub: WatchHub, open_stream: Opener
) -> None:
    feed.node("a", {"env": "prod"})
    await hub.catch_up()
    _, sink = open_stream("a")
    await settle()
    feed.assign((SEL_PROD,), "after-prune")
    feed.floor = feed.head  # history below head was pruned before the hub read it
    await hub.catch_up()
    await settle()
    assert sink.of("desired")[-1].digest == "after-prune"


async def test_feed_outage_degrades_and_ends_streams(feed: MemoryFeed) -> None:
    hub = WatchHub(feed, HubSettings(degraded_after=0.2, sweep_interval=0.05))
    feed.node("a", {})
    await hub.start()
    sink = RecordingSink()
    stream = hub.open("a", 0, hub.epoch, sink)
    feed.fail = True
    await asyncio.wait([stream.done], timeout=5)
    assert isinstance(stream.done.result(), Unavailable)
    assert hub.degraded
    feed.fail = False
    for _ in range(100):
        if not hub.degraded:
            break
        await asyncio.sleep(0.05)
    assert not hub.degraded
    await hub.stop(grace=0.1)


async def test_stop_sends_closing_bookmark(feed: MemoryFeed, hub: WatchHub, open_stream: Opener) -> None:
    feed.node("a", {})
    await hub.catch_up()
    stream, sink = open_stream("a")
    await settle()
    await hub.stop(grace=1.0)
    assert stream.done.done()
    assert sink.events[-1].bookmark.closing


async def test_was_sent_checks_the_stream_ledger(
    feed: MemoryFeed, hub: WatchHub, open_stream: Opener
) -> None:
    feed.node("a", {})
    revision = feed.assign((node_key("a"),), "d1")
    await hub.catch_up()
    stream, _ = open_stream("a")
    assert hub.was_sent(stream.stream_id, "a", revision, "d1") is True
    assert hub.was_sent(stream.stream_id, "a", revision, "forged") is False
    assert hub.was_sent(stream.stream_id, "other-node", revision, "d1") is False
    assert hub.was_sent("unknown-stream", "a", revision, "d1") is None


async def test_reassigning_the_same_bundle_is_delivered(
    feed: MemoryFeed, hub: WatchHub, open_stream: Opener
) -> None:
    """How an operator asks a node that rejected a bundle to try again."""
    feed.node("a", {})
    first = feed.assign((node_key("a"),), "d1")
    await hub.catch_up()
    _, sink = open_stream("a")
    again = feed.assign((node_key("a"),), "d1")
    await hub.catch_up()
    await settle()
    assert [(d.digest, d.assigned_revision) for d in sink.of("desired")] == [("d1", first), ("d1", again)]


async def test_revoked_node_streams_end(feed: MemoryFeed, hub: WatchHub, open_stream: Opener) -> None:
    feed.node("a", {})
    feed.node("b", {})
    await hub.catch_up()
    (stream_a, _), (stream_b, _) = open_stream("a"), open_stream("b")
    feed.revoke("a")
    await hub.catch_up()
    assert isinstance(stream_a.done.result(), Unauthenticated)
    assert not stream_b.done.done()
    assert not hub.knows_node("a")


async def test_an_acknowledgement_older_than_the_ledger_is_left_to_the_log(
    feed: MemoryFeed, hub: WatchHub, open_stream: Opener
) -> None:
    """The ledger holds the last LEDGER_SIZE deliveries; an ACK for an older one is
    "unknown, check the log", never "not sent"."""
    feed.node("a", {})
    await hub.catch_up()
    stream, sink = open_stream("a")
    sent = []
    for i in range(LEDGER_SIZE + 8):
        digest = f"d{i % 2}"
        sent.append((feed.assign((node_key("a"),), digest), digest))
        await hub.catch_up()
        await settle()
    assert [(d.revision, d.digest) for d in sink.of("desired")][1:] == sent
    (first, first_digest), (last, last_digest) = sent[0], sent[-1]
    assert hub.was_sent(stream.stream_id, "a", first, first_digest) is None
    assert hub.was_sent(stream.stream_id, "a", last, last_digest) is True
    # Within what the ledger still remembers, a delivery it does not hold was not made.
    assert hub.was_sent(stream.stream_id, "a", last, "forged") is False
    assert hub.was_sent(stream.stream_id, "a", sent[-5][0], "forged") is False
    assert hub.was_sent(stream.stream_id, "b", first, first_digest) is False


async def test_opens_are_refused_once_stopping_begins(
    feed: MemoryFeed, hub: WatchHub, open_stream: Opener
) -> None:
    feed.node("a", {})
    feed.node("b", {})
    await hub.catch_up()
    _, slow = open_stream("a")
    await settle()
    slow.block()
    feed.assign((node_key("a"),), "d1")  # a write stuck in flight: stop() waits for it
    await hub.catch_up()
    await settle()
    stopping = asyncio.create_task(hub.stop(grace=10.0))
    await settle()
    assert not stopping.done()
    with pytest.raises(Unavailable, match="shutting down") as refused:
        open_stream("b")
    assert refused.value.retry_after_ms
    assert hub.stream_count == 1
    slow.unblock()
    await stopping


class GatedFeed(MemoryFeed):
    """Holds the next changes() read, with its rows, until `release` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.hold = False
        self.holding = asyncio.Event()
        self.release = asyncio.Event()

    async def changes(self, after: int, upto: int) -> list[DesiredRow]:
        rows = await super().changes(after, upto)
        if self.hold:
            self.hold = False
            self.holding.set()
            await self.release.wait()
        return rows


async def test_concurrent_readers_never_move_the_hub_backwards() -> None:
    feed = GatedFeed()
    hub = WatchHub(feed, HubSettings(lifetime_min=100.0, lifetime_max=100.0))
    await hub.start(background=False)
    feed.node("a", {})
    await hub.catch_up()
    sink = RecordingSink()
    hub.open("a", 0, hub.epoch, sink)
    feed.assign((node_key("a"),), "d1")
    feed.hold = True
    first = asyncio.create_task(hub.catch_up())  # the background reader, say
    await feed.holding.wait()  # ... stuck with the rows of d1 in hand
    feed.assign((node_key("a"),), "d2")
    second = asyncio.create_task(hub.catch_up())  # a caller's catch_up()
    await settle()
    feed.release.set()
    await asyncio.gather(first, second)
    await settle()
    assert hub.position == feed.head
    effective = hub.effective("a")
    assert effective is not None and effective.digest == "d2"
    desired = [(d.revision, d.digest) for d in sink.of("desired")]
    assert desired[-1] == (feed.head, "d2")
    assert [r for r, _ in desired] == sorted({r for r, _ in desired}), desired
    await hub.stop(grace=0.1)


class PruningFeed(MemoryFeed):
    """Retention runs between the hub's position() and its changes() read."""

    def __init__(self) -> None:
        super().__init__()
        self.prune_before_read: int | None = None

    async def changes(self, after: int, upto: int) -> list[DesiredRow]:
        if self.prune_before_read is not None:
            self.prune(self.prune_before_read)
            self.prune_before_read = None
        return await super().changes(after, upto)


async def test_history_pruned_during_a_read_is_not_read_with_holes() -> None:
    """The tombstone and the assignment it buried are pruned while the hub reads the
    range holding the tombstone: the hub must not miss the unassignment."""
    feed = PruningFeed()
    hub = WatchHub(feed, HubSettings(lifetime_min=100.0, lifetime_max=100.0))
    await hub.start(background=False)
    feed.node("a", {})
    feed.assign((node_key("a"),), "d1")
    await hub.catch_up()
    sink = RecordingSink()
    hub.open("a", 0, hub.epoch, sink)
    await settle()
    feed.unassign((node_key("a"),))
    feed.assign((SEL_PROD,), "elsewhere")
    feed.assign((SEL_PROD,), "elsewhere-2")
    feed.prune_before_read = feed.head
    await hub.catch_up()
    await settle()
    assert hub.effective("a") is None
    assert [d.digest for d in sink.of("desired")] == ["d1", ""]
    assert hub.floor == feed.head
    await hub.stop(grace=0.1)


class Garbage:
    """Unreachable once dropped, but only a collection that looks at it can free it."""

    def __init__(self) -> None:
        self.cycle = self


async def test_an_ended_stream_caught_in_a_cycle_while_frozen_is_freed(
    feed: MemoryFeed, hub: WatchHub, open_stream: Opener
) -> None:
    """Frozen, then ended in a reference cycle: the collector cannot see it. The settle
    after the one that followed its end finds it alive, thaws and collects it."""
    feed.node("a", {})
    await hub.catch_up()
    stream, sink = open_stream("a")
    await settle()  # its first write goes out
    now = time.monotonic()
    hub.tick(now := now + hub.settings.gc_settle + 1)  # settles: the stream is frozen
    await settle()  # and the bookmark that tick sent goes out
    assert gc.get_freeze_count() > 0
    sink.cycle = stream  # type: ignore[attr-defined]  # stream -> sink -> stream
    freed = weakref.ref(stream)
    hub.close(stream)
    del stream, sink
    gc.collect()
    assert freed() is not None  # frozen: the collector does not look at it
    hub.tick(now := now + hub.settings.gc_settle + 1)  # the settle after its end
    assert freed() is not None, "thawed though the stream had only just ended"
    hub.tick(now := now + hub.settings.gc_settle + 1)  # nothing opened or ended since
    assert freed() is None, "an ended stream stayed frozen in its cycle"
    assert gc.get_freeze_count() > 0  # and the heap is frozen again


async def test_settling_under_churn_thaws_only_when_the_backstop_is_due(
    feed: MemoryFeed, hub: WatchHub, open_stream: Opener
) -> None:
    """While every ended stream is freed, a settle collects only what is not frozen: the
    full collection (seconds at a large fleet's heap) waits for `gc_thaw_after`."""
    s = hub.settings
    feed.node("a", {})
    await hub.catch_up()
    garbage = Garbage()
    freed = weakref.ref(garbage)
    gc.collect()
    gc.freeze()
    del garbage
    now = time.monotonic()
    # Churn that never quiets down, settled every gc_refreeze_after, short of the backstop.
    while now + s.gc_refreeze_after < hub._heap._thawed_at + s.gc_thaw_after:
        stream, _ = open_stream("a")
        hub.close(stream)
        await settle()  # its first write's task ends
        hub.tick(now := now + s.gc_refreeze_after + 1)
        assert gc.get_freeze_count() > 0
        assert freed() is not None, "a settle thawed though every ended stream was freed"
    stream, _ = open_stream("a")
    hub.close(stream)
    hub.tick(now + s.gc_thaw_after)
    assert freed() is None, "the backstop never thawed the heap"


async def test_selectors_the_floor_has_buried_are_forgotten(
    feed: MemoryFeed, hub: WatchHub, open_stream: Opener
) -> None:
    feed.node("a", {"env": "prod"})
    feed.assign((SEL_PROD,), "d1")
    feed.unassign((SEL_PROD,))
    await hub.catch_up()
    prod = {"env": "prod"}
    assert SEL_PROD in hub.image.keys_for("p", "a", prod)
    feed.node("b", {"env": "dev"})
    await hub.catch_up()
    feed.prune(feed.head)  # the tombstone is below the floor now, and gone from the log
    await hub.catch_up()
    assert hub.floor == hub.position  # followed, not rebuilt from a snapshot
    assert SEL_PROD not in hub.image.keys_for("p", "a", prod) and SEL_PROD not in hub.image.latest
    _, sink = open_stream("a")
    feed.assign((SEL_PROD,), "d2")  # the selector comes back: routed as before
    await hub.catch_up()
    await settle()
    assert [d.digest for d in sink.of("desired")] == ["", "d2"]


@pytest.mark.parametrize("turns", range(8))
async def test_stop_ends_the_reader_even_when_a_wakeup_lands_with_the_cancel(
    feed: MemoryFeed, turns: int
) -> None:
    """Python 3.11's asyncio.wait_for drops a cancellation that arrives as the awaited
    event fires; the reader then loops on and stop() never returns. Every offset between
    a wake-up and the cancel must still end the reader."""
    hub = WatchHub(feed, HubSettings(sweep_interval=0.05))
    await hub.start(background=True)
    await settle()
    hub.wake()
    for _ in range(turns):
        await asyncio.sleep(0)
    async with asyncio.timeout(5):
        await hub.stop(grace=0)


async def test_a_write_is_visible_before_its_fan_out_is_queued(feed: MemoryFeed) -> None:
    """The hub reads a revision, wakes whoever waits for it (the write's reply), and only
    then pays the streams it touched, a chunk at a time; a stream still owed the change
    gets no bookmark that would claim it has it."""
    hub = WatchHub(
        feed, HubSettings(bookmark_interval=1.0, lifetime_min=100.0, lifetime_max=100.0, fanout_chunk=1)
    )
    for i in range(3):
        feed.node(f"n{i}", {"env": "prod"})
    await hub.start()
    opened = [
        (hub.open(f"n{i}", 0, hub.epoch, sink), sink)
        for i, sink in enumerate(RecordingSink() for _ in range(3))
    ]
    await settle()
    revision = feed.assign((SEL_PROD,), "d1")
    hub.wake()
    assert await hub.wait_until(None, revision, 5.0)
    # Visible, while some streams are not even queued their change yet.
    assert sum(stream.in_flight for stream, _ in opened) < len(opened)
    hub.tick(time.monotonic() + 1.5)  # every stream's bookmark is due
    for _ in range(100):
        if all(sink.of("desired")[-1].revision == revision for _, sink in opened):
            break
        await settle()
    for _, sink in opened:
        # Bookmark-safe: nothing at or past the revision before the change itself.
        seen = [(e.WhichOneof("event"), e.desired.revision or e.bookmark.revision) for e in sink.events]
        first_change = seen.index(("desired", revision))
        assert all(rev < revision for _, rev in seen[:first_change]), seen
    await hub.stop(grace=0.1)


async def test_streams_opened_at_one_head_share_encodings_but_not_their_ids(
    feed: MemoryFeed, hub: WatchHub, open_stream: Opener
) -> None:
    feed.node("a", {"env": "prod"})
    feed.node("b", {"env": "prod"})
    feed.assign((SEL_PROD,), "d1")
    await hub.catch_up()
    opened = [open_stream("a"), open_stream("b"), open_stream("a", since=1)]
    await settle()
    for stream, sink in opened:
        started = sink.of("started")[0]
        assert started.stream_id == stream.stream_id
        assert (started.epoch, started.head_revision, started.floor_revision) == (
            hub.epoch,
            hub.position,
            hub.floor,
        )
        assert [d.digest for d in sink.of("desired")] == ["d1"]
    assert len({stream.stream_id for stream, _ in opened}) == 3
    assert [s.of("started")[0].mode for _, s in opened] == [pb.STREAM_MODE_BOOTSTRAP] * 2 + [
        pb.STREAM_MODE_RESUME
    ]


async def test_the_fan_out_lets_a_chunks_writes_return_before_the_next_chunk(feed: MemoryFeed) -> None:
    """A chunk's writes return before the next chunk is paid (so a new call is not queued
    behind every stream's write), and a later change finds the unpaid streams still owed:
    they get one message with the newest state."""
    hub = WatchHub(
        feed,
        HubSettings(lifetime_min=100.0, lifetime_max=100.0, fanout_chunk=1, fanout_wait=3600.0),
    )
    feed.node("a", {"env": "prod"})
    feed.node("b", {"env": "prod"})
    await hub.start()
    (_, first), (_, second) = [
        (hub.open(n, 0, hub.epoch, sink), sink)
        for n, sink in (("a", RecordingSink()), ("b", RecordingSink()))
    ]
    await settle()
    first.block()
    second.block()
    r1 = feed.assign((SEL_PROD,), "d1")
    hub.wake()
    assert await hub.wait_until(None, r1, 5.0)
    await settle()
    # One stream's write is out and stuck; the other is still owed, not written.
    assert (first.writes, second.writes) in ((2, 1), (1, 2))
    stuck, waiting = (first, second) if first.writes == 2 else (second, first)
    r2 = feed.assign((SEL_PROD,), "d2")
    hub.wake()
    assert await hub.wait_until(None, r2, 5.0)
    await settle()
    assert waiting.writes == 1
    stuck.unblock()
    waiting.unblock()
    for _ in range(100):
        if all(s.of("desired")[-1].digest == "d2" for s in (first, second)):
            break
        await settle()
    # The stream that waited got d2 alone (coalesced), the other d1 then d2.
    assert [d.digest for d in waiting.of("desired")] == ["", "d2"]
    assert [d.digest for d in stuck.of("desired")] == ["", "d1", "d2"]
    await hub.stop(grace=0.1)
