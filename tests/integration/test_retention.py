"""Retention: history below the floor is pruned, the current state never is, and a node
whose cursor fell below the floor is told so and bootstrapped."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from sqlalchemy import func, select, text

from controlplane.api.bundle.v1 import bundle_pb2 as bpb
from controlplane.api.watch.v1 import watch_pb2 as wpb
from controlplane.domain import desired as retention
from controlplane.domain.audit.context import acting_as, system
from controlplane.domain.kernel.clock import utcnow
from controlplane.domain.leases import Leases
from controlplane.store.schema import desired_state_log
from controlplane.tasks.retention import RETENTION_LEASE
from tests.conftest import HarnessFactory
from tests.support.archives import bundle
from tests.support.eventually import eventually
from tests.support.harness import Harness
from tests.support.liveness import alive


async def count_rows(harness_app: object, key_prefix: str = "") -> int:
    engine = harness_app.engine  # type: ignore[attr-defined]
    async with engine.connect() as conn:
        query = select(func.count()).select_from(desired_state_log)
        if key_prefix:
            query = query.where(desired_state_log.c.key.startswith(key_prefix))
        return int(await conn.scalar(query) or 0)


async def test_prune_keeps_current_state_and_resets_old_cursors(make_harness: HarnessFactory) -> None:
    h = await make_harness(retain_revisions=2, retain_for=timedelta(0), prune_interval=timedelta(seconds=0.2))
    digests = [await h.upload(bundle({"v": str(i).encode()})) for i in range(6)]
    node = await h.register("n1", {"env": "prod"})
    first = h.open_watch(node)
    await first.wait_for(lambda r: "snapshot_end" in r.kinds)
    old_cursor, epoch = first.last_revision(), first.epoch
    await first.cancel()

    for digest in digests:
        await h.assign(digest, selector="env=prod")
    await h.assign(digests[0], nodes=[node.node_id])
    await h.bundles.UnassignBundle(
        bpb.UnassignBundleRequest(
            project="default", target=bpb.Target(nodes=bpb.NodeList(node_ids=[node.node_id]))
        )
    )
    for _ in range(3):  # push the node key's rows below the floor
        await h.assign(digests[-1], selector="env=prod")
    head = h.app.hub.position

    async def pruned() -> None:
        # Below the floor only the latest row of each key is left; the last revisions
        # are kept whole. The selector's three newest rows sit at or above the floor. The
        # node key's tombstone goes together with the assignment it buried. Retention
        # raises the floor first and deletes afterwards, so wait for the deletes too.
        await h.app.hub.catch_up()
        assert h.app.hub.floor == head - 2, (h.app.hub.floor, head)
        assert await count_rows(h.app, "sel:") == 3
        assert await count_rows(h.app, "node:") == 0
        assert await count_rows(h.app, "meta:") == 1

    await eventually(pruned, what="retention raising the floor and pruning below it")

    stale = h.open_watch(node, since=old_cursor, epoch=epoch)
    await stale.wait_for(lambda r: "snapshot_end" in r.kinds, what="bootstrap after a too-old cursor")
    assert stale.of("reset")[0].reason == wpb.RESET_REASON_TOO_OLD
    assert stale.of("desired")[-1].digest == digests[-1]
    fresh_cursor = stale.last_revision()
    await stale.cancel()

    fresh = h.open_watch(node, since=fresh_cursor, epoch=epoch)
    await fresh.wait_for(lambda r: "bookmark" in r.kinds)
    assert fresh.of("started")[0].mode == wpb.STREAM_MODE_RESUME
    await fresh.cancel()

    # A late joiner still gets the current state after the history is gone.
    late = await h.register("late", {"env": "prod"})
    rec = h.open_watch(late)
    assert (await rec.wait_digest(digests[-1])).digest == digests[-1]
    await rec.cancel()


async def test_restart_serves_resumes_from_the_table(make_harness: HarnessFactory) -> None:
    first = await make_harness()
    digest = await first.upload(bundle({"a": b"1"}))
    node = await first.register("n1", {"env": "prod"})
    await first.assign(digest, selector="env=prod")
    rec = first.open_watch(node)
    await rec.wait_digest(digest)
    cursor, epoch = rec.last_revision(), rec.epoch
    await rec.cancel()
    await first.close()
    await first.app.stop()

    second = await make_harness()
    resumed = second.open_watch(node, since=cursor, epoch=epoch)
    await resumed.wait_for(lambda r: "bookmark" in r.kinds)
    assert resumed.of("started")[0].mode == wpb.STREAM_MODE_RESUME
    assert resumed.of("desired") == []
    await resumed.cancel()


async def test_a_read_the_floor_has_passed_returns_nothing_rather_than_holes(
    make_harness: HarnessFactory,
) -> None:
    """Retention may prune between the hub's read of the floor and its read of the rows:
    the rows then come back all or nothing, never with the pruned ones missing."""
    h = await make_harness(prune_interval=timedelta(hours=1))
    digests = [await h.upload(bundle({"v": str(i).encode()})) for i in range(3)]
    node = await h.register("n1")
    after = (await h.app.feed.position()).head
    for digest in digests:
        head = await h.assign(digest, nodes=[node.node_id])
    assert [r.revision for r in await h.app.feed.changes(after, head)] == [head - 2, head - 1, head]
    with acting_as(system("retention")):
        assert await retention.prune(h.app.store, head) > 0
    assert await h.app.feed.changes(after, head) == []
    assert await h.app.feed.changes(head - 1, head) == []  # the floor passed `after` = head - 1


async def test_one_replica_prunes_at_a_time(make_harness: HarnessFactory) -> None:
    h = await make_harness(retain_revisions=1, retain_for=timedelta(0), prune_interval=timedelta(hours=1))
    digest = await h.upload(bundle({"a": b"1"}))
    node = await h.register("n1")
    for _ in range(3):
        await h.assign(digest, nodes=[node.node_id])
    other = Leases(h.app.store, utcnow, holder="another-replica")
    async with alive(h.app, other.holder):
        held = await other.acquire(RETENTION_LEASE)
        assert held is not None
        await h.app.retention.run()  # the retention job's run on this replica
        assert (await h.app.feed.position()).floor == 0, "pruned while another replica held the lease"
        await other.release(held)
    await h.app.retention.run()
    assert (await h.app.feed.position()).floor == h.app.hub.position - 1


async def test_the_floor_never_moves_back_when_replicas_raise_it_at_once(pg_harness: Harness) -> None:
    """Two replicas prune at once: the one with the lower floor commits last. A read of
    the floor followed by a write would move it back; the conditional UPDATE does not."""
    h = pg_harness

    async def raise_floor(floor: int) -> bool:
        async with h.app.store.write() as tx:
            return await tx.desired.raise_floor(floor)

    async def blocked_on_the_floor_row() -> None:
        async with h.app.engine.connect() as conn:
            waiting = await conn.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            )
        assert waiting == 1

    async with h.app.store.write() as first:
        assert await first.desired.raise_floor(8)
        lower = asyncio.create_task(raise_floor(4))
        await eventually(blocked_on_the_floor_row, what="the second replica waiting for the floor row")
    assert await lower is False
    assert (await h.app.feed.position()).floor == 8
