"""Revisions become visible in commit order: no watcher ever skips one.

DESIGN §4.1: the revision is allocated inside the writing transaction under one row
lock. Here a writer takes revision R and holds its transaction open while a second
writer tries to commit: the second cannot take R+1 until the first commits, so a watcher
can never see R+1 before R.
"""

from __future__ import annotations

import asyncio

from controlplane.domain.desired import write_assignment
from controlplane.domain.kernel.labels import node_key
from controlplane.domain.model.desired import Assignment
from tests.support.archives import bundle
from tests.support.harness import Harness


async def test_held_transaction_is_never_skipped(pg_harness: Harness) -> None:
    h = pg_harness
    held_digest = await h.upload(bundle({"a": b"held"}))
    later_digest = await h.upload(bundle({"a": b"later"}))
    node = await h.register("n1", {"env": "prod"})
    other = await h.register("n2", {"env": "prod"})
    watch_held = h.open_watch(node)
    watch_other = h.open_watch(other)
    await watch_held.wait_for(lambda r: "snapshot_end" in r.kinds)
    await watch_other.wait_for(lambda r: "snapshot_end" in r.kinds)
    head_before = h.app.hub.position

    holding = asyncio.Event()
    release = asyncio.Event()

    async def held_writer() -> int:
        async with h.app.store.write() as tx:
            revision = await write_assignment(
                tx, Assignment("default", (node_key(node.node_id),), held_digest, 10), 0.0
            )
            holding.set()
            await release.wait()
        h.app.hub.wake()
        return revision

    held = asyncio.create_task(held_writer())
    await holding.wait()
    later = asyncio.create_task(h.assign(later_digest, nodes=[other.node_id]))
    # The later writer is stuck behind the revision lock; nothing became visible.
    await asyncio.sleep(0.5)
    assert not later.done(), "a second writer committed while an earlier revision was open"
    await h.app.hub.catch_up()
    assert h.app.hub.position == head_before

    release.set()
    held_revision = await held
    later_revision = await later
    assert later_revision == held_revision + 1

    got_held = await watch_held.wait_digest(held_digest)
    got_later = await watch_other.wait_digest(later_digest)
    assert got_held.revision == held_revision
    assert got_later.revision == later_revision
    # Bookmarks after the change never claim a revision the node has not been told about.
    await watch_held.wait_for(lambda r: any(b.revision >= later_revision for b in r.of("bookmark")))
    assert all(
        d.revision <= b.revision for d in watch_held.of("desired") for b in watch_held.of("bookmark")[-1:]
    )
    await watch_held.cancel()
    await watch_other.cancel()
