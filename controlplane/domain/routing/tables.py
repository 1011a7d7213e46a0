"""Routing tables: computed inside the writing transaction of whatever changed them, and
written to the desired-state log as a new revision only when the routing changed.

Every writer that can change a router's table calls `refresh` in its own transaction,
after its own writes: a rollout step, restore or end (`rollouts/commit.py`), a node's
registration or relabelling (`fleet/nodes.py`), an operator's assignment, pin or
unassignment (`fleet/assignments.py`), and declaring a router (`directory.py`). It
takes the revision lock first, so on PostgreSQL nothing another writer commits between
its reads and its write is missed: two refreshes of one router serialize, and the later
one computes from what the earlier one committed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime

from controlplane.domain.desired import effective_rows
from controlplane.domain.kernel.labels import Selector, route_key
from controlplane.domain.model.desired import ChangeKind, DesiredRow
from controlplane.domain.model.fleet import Node
from controlplane.domain.model.routing import RoutedBackend, Router, RouteTable
from controlplane.domain.ports import Tx
from controlplane.domain.routing.shares import Split, describe, serves, split_of, weights


@dataclass(frozen=True, slots=True)
class Backends:
    """A router's selector, resolved: the nodes with an address (by id, sorted) and the
    ids of those without."""

    routed: dict[str, Node]
    unrouted: tuple[str, ...]


async def backends(tx: Tx, router: Router) -> Backends:
    """The nodes of the router's selector (the router itself left out)."""
    ids = [
        n
        for n in await tx.rollouts.target_nodes(router.project, Selector.parse(router.selector).terms)
        if n != router.node_id
    ]
    nodes = sorted(await tx.nodes.get_many(ids) if ids else [], key=lambda n: n.id)
    return Backends({n.id: n for n in nodes if n.address}, tuple(n.id for n in nodes if not n.address))


async def splits(tx: Tx, node_ids: list[str], overrides: Mapping[str, Split | None]) -> list[Split]:
    """The splits of the active rollouts holding any of `node_ids`: `overrides` for the
    rollouts a caller is committing (their records in the store are not written yet),
    the store's for the others."""
    members = set(node_ids)
    held = set((await tx.rollouts.claims(node_ids)).values()) if node_ids else set()
    found: list[Split] = []
    for rollout_id in sorted(held | set(overrides)):
        if rollout_id in overrides:
            split = overrides[rollout_id]
        else:
            rollout = await tx.rollouts.get(rollout_id)
            if rollout is None:
                continue
            split = split_of(
                rollout, await tx.rollouts.steps(rollout_id), await tx.rollouts.nodes(rollout_id)
            )
        if split is not None and (split.new | split.old) & members:
            found.append(split)
    return found


async def compute(tx: Tx, router: Router, overrides: Mapping[str, Split | None] = {}) -> RouteTable:
    found = await backends(tx, router)
    ids = list(found.routed)
    held = await splits(tx, ids, overrides)
    desired = await effective_rows(tx, router.project, ids) if ids else {}
    serving = {n for n in ids if serves(desired.get(n), found.routed[n])}
    weighted = weights(ids, serving, held)
    return RouteTable(
        selector=router.selector,
        backend=router.backend,
        backends=tuple(RoutedBackend(n, found.routed[n].address, weighted[n]) for n in ids),
        unrouted=found.unrouted,
        reason=describe(held, weighted),
    )


async def current(tx: Tx, node_id: str) -> DesiredRow | None:
    """The latest ROUTES row of a router's key (None: none, or withdrawn)."""
    row = (await tx.desired.latest([route_key(node_id)])).get(route_key(node_id))
    return row if row is not None and row.kind is ChangeKind.ROUTES else None


async def write(tx: Tx, router: Router, table: RouteTable, now: datetime) -> int:
    revision = await tx.desired.allocate_revision()
    row = DesiredRow(
        key=route_key(router.node_id),
        revision=revision,
        project=router.project,
        kind=ChangeKind.ROUTES,
        written_at=now.timestamp(),
        routes=table,
    )
    await tx.desired.append([row])
    return revision


async def withdraw(tx: Tx, router: Router, now: datetime) -> int:
    revision = await tx.desired.allocate_revision()
    row = DesiredRow(
        route_key(router.node_id), revision, router.project, ChangeKind.UNASSIGN, written_at=now.timestamp()
    )
    await tx.desired.append([row])
    return revision


@dataclass(frozen=True, slots=True)
class Refreshed:
    """A router's routing table after a refresh: the revision in force (new, if
    `written`) and the table."""

    router: Router
    revision: int
    table: RouteTable
    written: bool


async def refresh(
    tx: Tx,
    project: str,
    now: datetime,
    overrides: Mapping[str, Split | None] = {},
    affects: Callable[[Router], bool] = lambda router: True,
) -> list[Refreshed]:
    """Recompute the tables of the project's routers (those `affects` picks) and write
    each one whose routing changed, at a revision of its own; every router considered
    is returned with the revision now in force. Costs one indexed read in a project
    without routers."""
    routers = [r for r in await tx.routers.of_project(project) if affects(r)]
    if not routers:
        return []
    await tx.desired.lock()
    written: list[Refreshed] = []
    for router in routers:
        table = await compute(tx, router, overrides)
        latest = await current(tx, router.node_id)
        if latest is not None and table.same_routing(latest.routes):
            written.append(Refreshed(router, latest.revision, table, False))
            continue
        revision = await write(tx, router, table, now)
        await tx.audit.record(
            "router.weights",
            f"node/{router.node_id}",
            project=project,
            after={
                "revision": revision,
                "weights": {b.node_id: b.weight for b in table.backends[:100]},
                "unrouted": list(table.unrouted[:20]),
                "reason": table.reason[:500],
            },
        )
        written.append(Refreshed(router, revision, table, True))
    return written


async def stale(tx: Tx, project: str) -> bool:
    """Whether a router of the project would get a new table now: a read, so that a
    caller takes the revision lock (`refresh`) only when there is something to write."""
    for router in await tx.routers.of_project(project):
        latest = await current(tx, router.node_id)
        if latest is None or not (await compute(tx, router)).same_routing(latest.routes):
            return True
    return False


async def coverage(tx: Tx, project: str) -> dict[str, set[str]]:
    """Each router of the project and the nodes it routes (those with an address)."""
    return {r.node_id: set((await backends(tx, r)).routed) for r in await tx.routers.of_project(project)}
