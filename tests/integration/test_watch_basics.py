"""WatchBundles end to end over a real gRPC server, on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import gc
import weakref

import grpc
import pytest
from sqlalchemy import select, update

from controlplane.api.identity.v1 import identity_pb2 as ipb
from controlplane.api.node.v1 import node_pb2 as npb
from controlplane.api.watch.v1 import watch_pb2 as pb
from controlplane.domain.model.desired import DesiredRow, FeedPosition, FeedSnapshot
from controlplane.store.schema import revision_counter, server_meta
from controlplane.watch.hub import HubSettings, WatchHub
from controlplane.watch.stream import LEDGER_SIZE
from tests.conftest import HarnessFactory
from tests.support.archives import bundle
from tests.support.eventually import eventually
from tests.support.harness import Harness


async def test_bootstrap_then_live_change(harness: Harness) -> None:
    v1 = await harness.upload(bundle({"main.kdl": b"v1"}))
    await harness.assign(v1, selector="env=prod")
    node = await harness.register("edge-1", {"env": "prod"})

    rec = harness.open_watch(node)
    await rec.wait_for(lambda r: "snapshot_end" in r.kinds, what="end of snapshot")
    (started,) = rec.of("started")
    assert started.mode == pb.STREAM_MODE_BOOTSTRAP
    assert rec.kinds[:3] == ["started", "desired", "snapshot_end"]
    desired = rec.of("desired")[0]
    assert desired.digest == v1
    assert desired.source == "env=prod"
    assert rec.of("snapshot_end")[0].revision == desired.revision == started.head_revision

    v2 = await harness.upload(bundle({"main.kdl": b"v2"}))
    revision = await harness.assign(v2, selector="env=prod")
    live = await rec.wait_digest(v2)
    assert live.revision == revision
    assert live.assigned_revision == revision
    await rec.cancel()


async def test_node_registered_later_gets_current_bundle(harness: Harness) -> None:
    v1 = await harness.upload(bundle({"a": b"1"}))
    await harness.assign(v1, selector="*")
    late = await harness.register("late", {"zone": "b"})
    rec = harness.open_watch(late)
    assert (await rec.wait_digest(v1)).digest == v1
    await rec.cancel()


async def test_resume_sends_no_bootstrap_and_only_changes(harness: Harness) -> None:
    v1 = await harness.upload(bundle({"a": b"1"}))
    node = await harness.register("n1", {"env": "prod"})
    await harness.assign(v1, nodes=[node.node_id])
    rec = harness.open_watch(node)
    await rec.wait_digest(v1)
    cursor, epoch = rec.last_revision(), rec.epoch
    await rec.cancel()

    # Nothing changed: a resume carries only a bookmark.
    again = harness.open_watch(node, since=cursor, epoch=epoch)
    await again.wait_for(lambda r: "bookmark" in r.kinds, what="bookmark")
    assert again.of("started")[0].mode == pb.STREAM_MODE_RESUME
    assert again.of("desired") == []
    assert "snapshot_end" not in again.kinds
    await again.cancel()

    # A change while disconnected arrives on resume.
    v2 = await harness.upload(bundle({"a": b"2"}))
    await harness.assign(v2, nodes=[node.node_id])
    third = harness.open_watch(node, since=cursor, epoch=epoch)
    assert (await third.wait_digest(v2)).digest == v2
    assert third.of("started")[0].mode == pb.STREAM_MODE_RESUME
    await third.cancel()


@pytest.mark.parametrize(
    ("since", "epoch", "reason"),
    [
        (10_000, None, pb.RESET_REASON_AHEAD_OF_HEAD),
        (1, "not-the-epoch", pb.RESET_REASON_EPOCH_CHANGED),
    ],
)
async def test_reset_then_bootstrap(harness: Harness, since: int, epoch: str | None, reason: int) -> None:
    node = await harness.register("n1", {})
    first = harness.open_watch(node)
    await first.wait_for(lambda r: "snapshot_end" in r.kinds)
    server_epoch = first.epoch
    await first.cancel()
    rec = harness.open_watch(node, since=since, epoch=server_epoch if epoch is None else epoch)
    await rec.wait_for(lambda r: "snapshot_end" in r.kinds, what="bootstrap after reset")
    assert rec.kinds[:4] == ["started", "reset", "desired", "snapshot_end"]
    assert rec.of("reset")[0].reason == reason
    assert rec.of("reset")[0].epoch == server_epoch
    await rec.cancel()


async def test_negative_since_revision_is_invalid(harness: Harness) -> None:
    node = await harness.register("n1", {})
    rec = harness.open_watch(node, since=-5)
    await rec.ended.wait()
    assert rec.error is not None
    assert rec.error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "since_revision" in (rec.error.details() or "")


@pytest.mark.parametrize("end", ["revoked", "epoch changed"])
async def test_an_aborted_stream_is_freed_though_the_heap_was_frozen(harness: Harness, end: str) -> None:
    """The hub freezes the heap once opens settle. A stream the server ends with an error
    afterwards must still be freed: nothing may tie it into a cycle with the call."""
    node = await harness.register("n1")
    rec = harness.open_watch(node)
    await rec.wait_for(lambda r: "snapshot_end" in r.kinds)
    freed = weakref.ref(harness.app.hub._streams.by_id[rec.stream_id])
    gc.collect()
    gc.freeze()
    try:
        if end == "revoked":
            await harness.identity.RevokeNode(ipb.RevokeNodeRequest(node_id=node.node_id))
            code = grpc.StatusCode.UNAUTHENTICATED
        else:  # restored from a backup, say
            async with harness.app.engine.begin() as conn:
                await conn.execute(
                    update(server_meta).where(server_meta.c.key == "epoch").values(value="restored")
                )
            harness.app.hub.wake()
            code = grpc.StatusCode.UNAVAILABLE
        await rec.ended.wait()
        assert rec.error is not None and rec.error.code() == code, rec.error

        async def stream_freed() -> None:
            # grpc's accept loop holds the last call it took until it takes another.
            await harness.nodes.ListNodes(npb.ListNodesRequest(project="default"))
            gc.collect()
            assert freed() is None, "the ended stream is still referenced"

        await eventually(stream_freed, timeout=5.0, what="the aborted stream freed while frozen")
    finally:
        gc.unfreeze()


async def test_an_acknowledgement_of_an_early_delivery_is_accepted(harness: Harness) -> None:
    """A stream remembers only its latest deliveries; an ACK for one before those is
    checked against the log, not refused."""
    first, other = await harness.upload(bundle({"a": b"1"})), await harness.upload(bundle({"a": b"2"}))
    node = await harness.register("n1")
    rec = harness.open_watch(node)
    early = await harness.assign(first, nodes=[node.node_id])
    await rec.wait_digest(first)
    for i in range(LEDGER_SIZE + 2):
        last = await harness.assign(other if i % 2 == 0 else first, nodes=[node.node_id])
    await rec.wait_for(lambda r: any(d.revision == last for d in r.of("desired")), what="the last delivery")
    await harness.nodes.ReportStatus(
        npb.ReportStatusRequest(
            node_id=node.node_id,
            stream_id=rec.stream_id,
            revision=early,
            digest=first,
            phase=npb.REPORT_PHASE_ACTIVE,
        ),
        metadata=node.metadata,
    )
    got = await harness.nodes.GetNode(npb.GetNodeRequest(node_id=node.node_id))
    assert got.node.last_report.revision == early and got.node.applied_digest == first
    await rec.cancel()


class HeldHub:
    """Stands in the hub's feed and its `wait_until` until released: the hub cannot read,
    so whoever waits for it to read is held too, and says so. An open that needs the
    hub to catch up then holds its place among the opening streams for exactly as long
    as the test says (and its visibility timeout starts only when released)."""

    def __init__(self, hub: WatchHub):
        self._feed, self._wait_until = hub.feed, hub.wait_until
        self.waiting = asyncio.Event()
        self.released = asyncio.Event()

    async def position(self) -> FeedPosition:
        await self.released.wait()
        return await self._feed.position()

    async def changes(self, after: int, upto: int) -> list[DesiredRow]:
        return await self._feed.changes(after, upto)

    async def snapshot(self) -> FeedSnapshot:
        return await self._feed.snapshot()

    async def wait_until(
        self, node_id: str | None, revision: int, within: float, epoch: str | None = None
    ) -> bool:
        self.waiting.set()
        await self.released.wait()
        return await self._wait_until(node_id, revision, within, epoch)


async def test_too_many_opening_at_once_is_resource_exhausted_with_a_retry_hint(
    make_harness: HarnessFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = await make_harness(hub=HubSettings(bookmark_interval=1.0, max_opening=1))
    node, other = await h.register("n1"), await h.register("n2")
    first = h.open_watch(node)
    await first.wait_for(lambda r: "snapshot_end" in r.kinds)
    epoch = first.epoch
    await first.cancel()
    held = HeldHub(h.app.hub)
    await h.app.hub.catch_up()  # no read in progress: the next one goes through `held`
    monkeypatch.setattr(h.app.hub, "feed", held)
    monkeypatch.setattr(h.app.hub, "wait_until", held.wait_until)
    # A revision the hub has not read (another replica's, say): a node that has seen it
    # waits for this hub to read it, holding the one place among opening streams.
    async with h.app.engine.begin() as conn:
        await conn.execute(update(revision_counter).values(value=revision_counter.c.value + 1))
        seen = int(await conn.scalar(select(revision_counter.c.value)) or 0)
    waiting = h.open_watch(node, since=seen, epoch=epoch)
    try:
        async with asyncio.timeout(10):
            await held.waiting.wait()  # admitted, and waiting for the hub
        refused = h.open_watch(other)
        await refused.wait_for(lambda r: r.ended.is_set() or bool(r.events), what="an answer")
        assert refused.ended.is_set() and not refused.events, "opened while another open held the only place"
        assert refused.error is not None and refused.error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "too many streams are opening" in (refused.error.details() or "")
        assert int(dict(await refused.call.trailing_metadata()).get("retry-after-ms", 0)) > 0, "no retry hint"
        assert waiting.events == [] and not waiting.ended.is_set()
        held.released.set()
        await waiting.wait_for(lambda r: "bookmark" in r.kinds, what="the waiting open resumed")
        assert waiting.of("started")[0].mode == pb.STREAM_MODE_RESUME
        # Its place is free again: the refused node gets in now.
        again = h.open_watch(other)
        await again.wait_for(lambda r: "snapshot_end" in r.kinds, what="the refused node let in")
        await again.cancel()
    finally:
        held.released.set()
        await waiting.cancel()
