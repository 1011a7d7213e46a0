"""Retention of the desired-state log: raise the floor, then prune below it."""

from __future__ import annotations

from controlplane.domain.ports import Store

# Rows deleted per transaction: short transactions keep the revision lock free for
# writers on SQLite, where every write transaction is exclusive.
PRUNE_BATCH = 2000


async def prune(store: Store, floor: int, batch: int = PRUNE_BATCH) -> int:
    """Make `floor` the oldest revision a resume can start from and delete what only
    older cursors needed. The floor is raised first, in its own commit, so no stream
    resumes into history that is about to disappear. Returns rows deleted."""
    async with store.write() as tx:
        if not await tx.desired.raise_floor(floor):
            return 0
        await tx.audit.record("retention.floor", "desired-state-log", after={"floor_revision": floor})
    total = 0
    while True:
        async with store.write() as tx:
            deleted = await tx.desired.prune_below(floor, batch)
        total += deleted
        # A tombstone becomes deletable once the rows it buried are gone: go until a
        # pass finds nothing.
        if deleted == 0:
            return total
