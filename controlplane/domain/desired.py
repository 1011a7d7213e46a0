"""The desired-state log's own operations: the one write path every assignment takes
(`AssignBundle`, rollout steps, rollbacks, drift remediation and key rotation call
`write_assignment` inside their own transaction, so each is one revision and one
commit), retention (raise the floor, then prune below it), and reading what decides
nodes' desired state inside a writing transaction: the latest row of their own keys,
and their effective row resolved over all their keys exactly as their watch resolves
it (the hub's image may be a commit behind)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

from controlplane.domain.kernel import observe
from controlplane.domain.kernel.labels import node_key, parse_selector_key
from controlplane.domain.model.desired import Assignment, ChangeKind, DesiredRow, resolve
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


T = TypeVar("T")
# Keys per `IN (...)` query: far below either database's parameter limit.
_CHUNK = 500


def chunks(items: Sequence[T], size: int = _CHUNK) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


async def latest_node_rows(tx: Tx, node_ids: Sequence[str]) -> dict[str, DesiredRow]:
    """The latest row of each node's own key (a pin, an assignment or a tombstone)."""
    rows: dict[str, DesiredRow] = {}
    for part in chunks(node_ids):
        found = await tx.desired.latest([node_key(n) for n in part])
        rows.update({key[5:]: row for key, row in found.items()})
    return rows


def is_pin(row: DesiredRow | None) -> bool:
    return row is not None and row.is_assignment and row.pinned


async def effective_rows(tx: Tx, project: str, node_ids: Sequence[str]) -> dict[str, DesiredRow | None]:
    """Each node's effective desired row, resolved inside `tx` over all its keys — its own
    `node:<id>` and every selector of the project its labels match — exactly as its watch
    resolves them (`desired.resolve`), at this transaction's snapshot (the hub's image
    may be a commit behind)."""
    own = await latest_node_rows(tx, node_ids)
    selectors = [
        (key, parsed[1])
        for key in await tx.desired.selector_keys(project)
        if (parsed := parse_selector_key(key)) is not None
    ]
    baselines: dict[str, DesiredRow] = {}
    for part in chunks([key for key, _ in selectors]):
        baselines.update(await tx.desired.latest(part))
    live = [(selector, baselines[key]) for key, selector in selectors if key in baselines]
    out: dict[str, DesiredRow | None] = {}
    for part in chunks(node_ids):
        for node in await tx.nodes.get_many(part):
            matching = (row for selector, row in live if selector.matches(node.labels))
            out[node.id] = resolve([own.get(node.id), *matching], node.id)
    return out
