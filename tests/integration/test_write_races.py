"""Writers that check and then write, racing on PostgreSQL (READ COMMITTED), each with
the interleaving forced: a key retired while an assignment is between reading the
bundle's signature and writing it, a status report recorded by another replica
while a stalled batch holds an older one, and a late report whose batch waited for the
node's lock while a newer revision and its report were committed. SQLite's writers are one at a time, so only
PostgreSQL can interleave them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Coroutine
from datetime import timedelta
from typing import Any, TypeVar

import grpc
import pytest
from sqlalchemy import text

from controlplane.api.audit.v1 import audit_pb2 as apb
from controlplane.api.bundle.v1 import bundle_pb2 as bpb
from controlplane.api.node.v1 import node_pb2 as npb
from controlplane.domain.audit.context import acting_as, system
from controlplane.domain.bundles.keys import KeyDirectory
from controlplane.domain.bundles.registry import require_assignable
from controlplane.domain.bundles.signing import Signer
from controlplane.domain.fleet import assignments
from controlplane.domain.kernel.clock import utcnow
from controlplane.domain.kernel.labels import node_key
from controlplane.domain.model.bundles import Bundle
from controlplane.domain.model.fleet import Node
from controlplane.domain.ports import Tx
from controlplane.store.nodes import SqlNodes
from tests.conftest import HarnessFactory
from tests.support.eventually import eventually
from tests.support.harness import Harness, Registered
from tests.support.rollout_fleet import archive

pytestmark = pytest.mark.postgres

T = TypeVar("T")


async def waiting_on_a_lock(h: Harness) -> bool:
    async with h.app.store.engine.connect() as conn:
        return bool(await conn.scalar(text("SELECT count(*) FROM pg_locks WHERE NOT granted")))


async def settled(task: asyncio.Task[Any], h: Harness) -> None:
    """`task` either finished (nothing made it wait) or waits on a lock."""

    async def check() -> None:
        assert task.done() or await waiting_on_a_lock(h)

    await eventually(check, what="the other writer done or waiting on a lock")


async def while_assigning(
    h: Harness,
    monkeypatch: pytest.MonkeyPatch,
    node_id: str,
    digest: str,
    other: Callable[[], Coroutine[Any, Any, T]],
) -> T:
    """Assign `digest` to the node and, once the assignment has read the bundle (and its
    signature) but before it writes, run `other` as an operator; let the assignment go
    on once `other` has finished or waits on a lock. Returns what `other` returned."""
    read, go_on = asyncio.Event(), asyncio.Event()

    async def read_then_stall(tx: Tx, project: str, digest: str, field: str = "digest") -> Bundle:
        bundle = await require_assignable(tx, project, digest, field)
        read.set()
        await go_on.wait()
        return bundle

    monkeypatch.setattr(assignments, "require_assignable", read_then_stall)
    assigning = asyncio.create_task(h.assign(digest, nodes=[node_id]))
    await asyncio.wait_for(read.wait(), 10)
    with acting_as(system("test-operator")):
        racing = asyncio.create_task(other())
        await settled(racing, h)
    go_on.set()
    await assigning
    return await racing


async def test_a_key_retired_while_an_assignment_is_signing_is_not_left_on_it(
    make_pg_harness: HarnessFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The assignment has read the bundle's newest signature (by K1) when K1 is retired.
    Retirement re-signs every assignment signed by K1: it must either see this one or
    make it read K1 as retired; a K1-signed row left behind is refused by every agent."""
    h = await make_pg_harness()
    node = await h.register("n1")
    digest = await h.upload(archive("v1"))  # signed by the server's key, K1
    k1 = h.app.signing_keys.signer.key_id
    # K2 signs too, an hour "earlier", so K1's stays the newest signature.
    k2 = KeyDirectory(h.app.store, lambda: utcnow() - timedelta(hours=1), Signer.generate(), h.app.hub.wake)
    await k2.register()
    assert await k2.sign_unsigned() == 1
    _, resigned = await while_assigning(h, monkeypatch, node.node_id, digest, lambda: k2.retire(k1))
    async with h.app.store.read() as tx:
        row = (await tx.desired.latest([node_key(node.node_id)]))[node_key(node.node_id)]
    assert row.key_id == k2.signer.key_id, f"the node's desired state is signed by retired {row.key_id}"
    assert resigned == 1


async def two_replicas_with_a_node(
    make: HarnessFactory,
) -> tuple[Harness, Harness, Registered, str, int, str]:
    """Replicas A and B of one database, a node assigned v1 at r1 (returned), and v2
    uploaded, not assigned yet."""
    a = await make()
    b = await make()
    node = await a.register("n1")
    v1 = await a.upload(archive("v1"))
    r1 = await a.assign(v1, nodes=[node.node_id])
    v2 = await a.upload(archive("v2"))
    return a, b, node, v1, r1, v2


async def test_a_stalled_older_report_does_not_overwrite_a_newer_one(
    make_pg_harness: HarnessFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replica A's batch holding the node's ACTIVE for revision r1 stalls after reading
    the node (its caller timed out; the batch goes on); meanwhile the node reports ACTIVE
    for r2 to replica B. The node must end on r2: B's report waits for A's and is checked
    against it, never overwritten by the older one."""
    a, b, node, v1, r1, v2 = await two_replicas_with_a_node(make_pg_harness)
    r2 = await a.assign(v2, nodes=[node.node_id])
    read, go_on = asyncio.Event(), asyncio.Event()
    get_many = SqlNodes.get_many

    async def read_then_stall(
        self: SqlNodes, node_ids: Collection[str], for_update: bool = False
    ) -> list[Node]:
        found = await get_many(self, node_ids, for_update)
        if not read.is_set():
            read.set()
            await go_on.wait()
        return found

    monkeypatch.setattr(SqlNodes, "get_many", read_then_stall)

    async def active(replica: Harness, stream_id: str, revision: int, digest: str) -> None:
        request = npb.ReportStatusRequest(
            node_id=node.node_id,
            stream_id=stream_id,
            revision=revision,
            digest=digest,
            phase=npb.REPORT_PHASE_ACTIVE,
        )
        await replica.nodes.ReportStatus(request, metadata=node.metadata)

    older = asyncio.create_task(active(a, "stream-a", r1, v1))
    await asyncio.wait_for(read.wait(), 10)
    newer = asyncio.create_task(active(b, "stream-b", r2, v2))
    await settled(newer, a)
    go_on.set()
    await older
    await newer
    stored = await a.app.nodes.get(node.node_id)
    assert stored.last_report is not None
    assert (stored.last_report.revision, stored.applied_digest) == (r2, v2)


async def test_a_bundle_revoked_while_an_assignment_is_writing_it_is_revoked_after_it(
    make_pg_harness: HarnessFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The assignment has found the bundle valid when an operator revokes it. The
    history must read as one order: the assignment then the revocation (which waited),
    never a revocation followed by an assignment of the revoked bundle."""
    h = await make_pg_harness()
    node = await h.register("n1")
    digest = await h.upload(archive("v1"))

    async def revoke() -> None:
        await h.bundles.RevokeBundle(
            bpb.RevokeBundleRequest(project="default", digest=digest, reason="leaked")
        )

    await while_assigning(h, monkeypatch, node.node_id, digest, revoke)
    listed = await h.audit.ListAuditEvents(apb.ListAuditEventsRequest(project="default", page_size=1000))
    order = [e.action for e in listed.events if e.action in ("desired.assign", "bundle.revoke")]
    assert order == ["desired.assign", "bundle.revoke"]


async def test_a_report_that_waited_for_the_lock_is_judged_against_the_newest_head(
    make_pg_harness: HarnessFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replica A's batch holding the node's late ACTIVE for r1 stalls before it locks the
    node's row; meanwhile r2 is written and the node reports ACTIVE for r2 to replica B.
    A's report must be judged against a head that includes r2 (read after the lock):
    refused as stale, the node stays on r2 — never moved back by the late report."""
    a, b, node, v1, r1, v2 = await two_replicas_with_a_node(make_pg_harness)
    stalled, go_on = asyncio.Event(), asyncio.Event()
    get_many = SqlNodes.get_many

    async def stall_then_lock(
        self: SqlNodes, node_ids: Collection[str], for_update: bool = False
    ) -> list[Node]:
        if not stalled.is_set():
            stalled.set()
            await go_on.wait()
        return await get_many(self, node_ids, for_update)

    monkeypatch.setattr(SqlNodes, "get_many", stall_then_lock)

    def active(revision: int, digest: str, stream_id: str) -> npb.ReportStatusRequest:
        return npb.ReportStatusRequest(
            node_id=node.node_id,
            stream_id=stream_id,
            revision=revision,
            digest=digest,
            phase=npb.REPORT_PHASE_ACTIVE,
        )

    async def report(replica: Harness, request: npb.ReportStatusRequest) -> None:
        await replica.nodes.ReportStatus(request, metadata=node.metadata)

    late = asyncio.create_task(report(a, active(r1, v1, "stream-a")))
    await asyncio.wait_for(stalled.wait(), 10)
    r2 = await a.assign(v2, nodes=[node.node_id])
    await report(b, active(r2, v2, "stream-b"))
    go_on.set()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await late
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION, refused.value
    assert "stale report" in str(refused.value.details())
    stored = await a.app.nodes.get(node.node_id)
    assert stored.last_report is not None
    assert (stored.last_report.revision, stored.applied_digest) == (r2, v2)
