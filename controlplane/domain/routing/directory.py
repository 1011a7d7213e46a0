"""RouterDirectory: declaring, removing and looking at routers (NodeService's router RPCs).

Declaring checks the node exists and may act, the selector matches at least one node
besides the router, and every node it matches registered an address (a router could not
send traffic to one that did not, so that would be a silent hole). It then writes the
router's first routing table in the same transaction, audited. Nodes that join the
selector later without an address are left out of the table and named in it
(`RouteTable.unrouted`), since refusing their registration is not the router's call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from controlplane.domain.audit.context import current_actor
from controlplane.domain.kernel.errors import FailedPrecondition, NotFound
from controlplane.domain.kernel.labels import Selector
from controlplane.domain.kernel.secrets import BARRED
from controlplane.domain.model.fleet import Node
from controlplane.domain.model.routing import Router, RouteTable
from controlplane.domain.ports import Clock, DesiredView, Store, Tx
from controlplane.domain.routing import tables
from controlplane.domain.routing.checks import backend_name

# How long an answer waits for this process's hub to route the table it wrote.
READ_YOUR_WRITES = 2.0
# Nodes named in a refusal: enough to act on, bounded for a big selector.
_NAMED = 10


@dataclass(frozen=True, slots=True)
class RouterView:
    router: Router
    # The routing table in force and its revision (None, 0 before any was written).
    table: RouteTable | None
    revision: int
    # What the router acknowledged, and its refusal since, if any.
    applied_revision: int
    error: str


@dataclass
class RouterDirectory:
    store: Store
    clock: Clock
    notify: Callable[[], None]
    view: DesiredView

    async def declare(self, node_id: str, selector: str, backend: str) -> RouterView:
        parsed = Selector.parse(selector)
        backend = backend_name(backend)
        now = self.clock()
        async with self.store.write() as tx:
            node = await _node(tx, node_id)
            if await tx.nodes.credential_hash(node_id) == BARRED:
                raise FailedPrecondition(f"node {node_id} was revoked; it cannot route", field="node_id")
            before = await tx.routers.get(node_id)
            router = Router(
                node_id,
                node.project,
                parsed.canonical(),
                backend,
                before.created_by if before else str(current_actor()),
                before.created_at if before else now,
            )
            found = await tables.backends(tx, router)
            if not found.routed and not found.unrouted:
                raise FailedPrecondition(
                    f"selector {router.selector!r} matches no node of project {node.project!r} "
                    "besides the router: it would route to nothing",
                    field="selector",
                )
            if found.unrouted:
                names = ", ".join(found.unrouted[:_NAMED])
                more = f" (+{len(found.unrouted) - _NAMED} more)" if len(found.unrouted) > _NAMED else ""
                raise FailedPrecondition(
                    f"{len(found.unrouted)} node(s) of selector {router.selector!r} registered no "
                    f"address, so the router could send them no traffic: {names}{more}; run their "
                    "agents with --address HOST:PORT (where their proxy serves)",
                    field="selector",
                )
            await tx.routers.put(router)
            written = [
                r
                for r in await tables.refresh(tx, node.project, now, affects=lambda r: r.node_id == node_id)
                if r.written
            ]
            await tx.audit.record(
                "router.declare",
                f"node/{node_id}",
                project=node.project,
                before={"selector": before.selector, "backend": before.backend} if before else None,
                after={
                    "selector": router.selector,
                    "backend": backend,
                    "backends": len(found.routed),
                    "revision": written[0].revision if written else None,
                },
            )
            tx.after_commit(self.notify)
        if written:
            await self.view.wait_until(None, written[0].revision, READ_YOUR_WRITES)
        return await self.get(node_id)

    async def remove(self, node_id: str) -> int:
        now = self.clock()
        async with self.store.write() as tx:
            node = await _node(tx, node_id)
            router = await tx.routers.get(node_id)
            if router is None:
                raise NotFound(f"node {node_id} is not a router", field="node_id")
            await tx.desired.lock()
            await tx.routers.delete(node_id)
            revision = await tables.withdraw(tx, router, now)
            await tx.audit.record(
                "router.remove",
                f"node/{node_id}",
                project=node.project,
                before={"selector": router.selector, "backend": router.backend},
                after={"revision": revision},
            )
            tx.after_commit(self.notify)
        await self.view.wait_until(None, revision, READ_YOUR_WRITES)
        return revision

    async def get(self, node_id: str) -> RouterView:
        async with self.store.read() as tx:
            node = await _node(tx, node_id)
            router = await tx.routers.get(node_id)
            if router is None:
                raise NotFound(f"node {node_id} is not a router", field="node_id")
            return await _view(tx, router, node)

    async def list(self, project: str) -> list[RouterView]:
        async with self.store.read() as tx:
            routers = await tx.routers.of_project(project)
            nodes = {n.id: n for n in await tx.nodes.get_many([r.node_id for r in routers])}
            return [await _view(tx, r, nodes[r.node_id]) for r in routers if r.node_id in nodes]


async def _node(tx: Tx, node_id: str) -> Node:
    node = await tx.nodes.get(node_id) if node_id else None
    if node is None:
        raise NotFound(f"node {node_id!r} does not exist", field="node_id")
    return node


async def _view(tx: Tx, router: Router, node: Node) -> RouterView:
    row = await tables.current(tx, router.node_id)
    refused = node.failed_revision > node.applied_revision
    return RouterView(
        router,
        row.routes if row is not None else None,
        row.revision if row is not None else 0,
        node.applied_revision,
        node.failed_error if refused else "",
    )
