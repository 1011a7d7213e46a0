"""The desired-state log's own operations: the one write path every assignment takes
(`AssignBundle`, rollout steps, rollbacks, drift remediation and key rotation call
`write_assignment` inside their own transaction, so each is one revision and one
commit), and retention (raise the floor, then prune below it)."""

from __future__ import annotations

from collections.abc import Sequence

from controlplane.domain.kernel import observe
from controlplane.domain.model.desired import Assignment, ChangeKind, DesiredRow
from controlplane.domain.ports import Store, Tx

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


async def write_assignment(tx: Tx, assignment: Assignment, written_at: float) -> int:
    """Write one assignment at a fresh revision, inside `tx`. Returns the revision."""
    revision = await tx.desired.allocate_revision()
    await tx.desired.append(assignment.rows(revision, written_at, observe.traceparent()))
    return revision


async def write_unassignment(tx: Tx, project: str, keys: Sequence[str], written_at: float) -> int:
    revision = await tx.desired.allocate_revision()
    rows = [DesiredRow(key, revision, project, ChangeKind.UNASSIGN, written_at=written_at) for key in keys]
    await tx.desired.append(rows)
    return revision
