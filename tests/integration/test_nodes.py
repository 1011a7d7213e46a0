"""Node lifecycle over gRPC: registration, heartbeats, liveness, labels, status reports."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import grpc
import pytest
from sqlalchemy import event

from controlplane.api.audit.v1 import audit_pb2 as apb
from controlplane.api.node.v1 import node_pb2 as npb
from controlplane.domain.fleet.nodes import HEARTBEAT_HISTORY
from controlplane.domain.model.fleet import ReportPhase, XdsRecord
from tests.conftest import HarnessFactory
from tests.support.archives import bundle
from tests.support.eventually import eventually
from tests.support.harness import Harness


async def test_register_returns_id_and_credential(harness: Harness) -> None:
    node = await harness.register("edge-1", {"env": "prod", "region": "eu-west"})
    reply = await harness.nodes.GetNode(npb.GetNodeRequest(node_id=node.node_id))
    assert reply.node.name == "edge-1"
    assert dict(reply.node.labels) == {"env": "prod", "region": "eu-west"}
    assert reply.node.project == "default"
    assert reply.node.status == npb.NODE_STATUS_OFFLINE  # no heartbeat yet


async def test_reregistering_keeps_the_id_and_kills_the_old_credential(harness: Harness) -> None:
    first = await harness.register("edge-1", {"env": "prod"})
    second = await harness.register("edge-1", {"env": "prod"})
    assert first.node_id == second.node_id
    assert first.credential != second.credential
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await harness.nodes.Heartbeat(npb.HeartbeatRequest(node_id=first.node_id), metadata=first.metadata)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    await harness.nodes.Heartbeat(npb.HeartbeatRequest(node_id=second.node_id), metadata=second.metadata)


async def test_heartbeats_store_latest_and_bounded_history(harness: Harness) -> None:
    node = await harness.register("n1")
    for i in range(HEARTBEAT_HISTORY + 10):
        metrics = npb.NodeMetrics(health=npb.HEALTH_STATUS_HEALTHY, error_rate=0.01, p99_latency_ms=float(i))
        reply = await harness.nodes.Heartbeat(
            npb.HeartbeatRequest(node_id=node.node_id, metrics=metrics), metadata=node.metadata
        )
    assert reply.interval_seconds == 10
    got = await harness.nodes.GetNode(npb.GetNodeRequest(node_id=node.node_id))
    assert got.node.status == npb.NODE_STATUS_ONLINE
    assert got.node.last_heartbeat.metrics.p99_latency_ms == HEARTBEAT_HISTORY + 9
    history = await harness.nodes.ListHeartbeats(npb.ListHeartbeatsRequest(node_id=node.node_id))
    assert len(history.heartbeats) == HEARTBEAT_HISTORY
    latencies = [h.metrics.p99_latency_ms for h in history.heartbeats]
    assert latencies == [float(i) for i in range(HEARTBEAT_HISTORY + 9, 9, -1)]


async def test_metrics_a_node_did_not_report_stay_absent(harness: Harness) -> None:
    """Absent is stored and shown as absent, and an explicit 0.0 as 0.0: GetNode,
    ListNodes and ListHeartbeats never turn a missing metric into a zero."""
    node = await harness.register("n1")

    async def beat(metrics: npb.NodeMetrics | None) -> None:
        await harness.nodes.Heartbeat(
            npb.HeartbeatRequest(node_id=node.node_id, metrics=metrics), metadata=node.metadata
        )

    def reported(m: npb.NodeMetrics) -> dict[str, float]:
        return {f.name: v for f, v in m.ListFields() if f.name != "health"}

    await beat(None)
    got = (await harness.nodes.GetNode(npb.GetNodeRequest(node_id=node.node_id))).node
    assert got.HasField("last_heartbeat") and got.status == npb.NODE_STATUS_ONLINE
    assert got.last_heartbeat.metrics.health == npb.HEALTH_STATUS_UNSPECIFIED
    assert reported(got.last_heartbeat.metrics) == {}
    await beat(npb.NodeMetrics(health=npb.HEALTH_STATUS_HEALTHY, error_rate=0.0, cpu_percent=12.5))
    got = (await harness.nodes.GetNode(npb.GetNodeRequest(node_id=node.node_id))).node
    assert reported(got.last_heartbeat.metrics) == {"error_rate": 0.0, "cpu_percent": 12.5}
    assert got.last_heartbeat.metrics.HasField("error_rate")
    listed = (await harness.nodes.ListNodes(npb.ListNodesRequest(project="default"))).nodes
    assert [reported(n.last_heartbeat.metrics) for n in listed] == [{"error_rate": 0.0, "cpu_percent": 12.5}]
    history = await harness.nodes.ListHeartbeats(npb.ListHeartbeatsRequest(node_id=node.node_id))
    assert [reported(h.metrics) for h in history.heartbeats] == [{"error_rate": 0.0, "cpu_percent": 12.5}, {}]


async def test_concurrent_heartbeats_are_each_stored_and_audited_once(harness: Harness) -> None:
    """Many nodes beating at once share transactions (group commit): every beat still
    lands in its node's history in order, and each node's return to ONLINE is one entry."""
    nodes = [await harness.register(f"n{i}") for i in range(24)]
    beats = 6

    async def beat(node: Any, i: int) -> None:
        for k in range(beats):
            metrics = npb.NodeMetrics(health=npb.HEALTH_STATUS_HEALTHY, p99_latency_ms=float(i * 100 + k))
            await harness.nodes.Heartbeat(
                npb.HeartbeatRequest(node_id=node.node_id, metrics=metrics), metadata=node.metadata
            )

    await asyncio.gather(*(beat(node, i) for i, node in enumerate(nodes)))
    for i, node in enumerate(nodes):
        history = await harness.nodes.ListHeartbeats(npb.ListHeartbeatsRequest(node_id=node.node_id))
        assert [h.metrics.p99_latency_ms for h in history.heartbeats] == [
            float(i * 100 + k) for k in reversed(range(beats))
        ]
        got = (await harness.nodes.GetNode(npb.GetNodeRequest(node_id=node.node_id))).node
        assert got.status == npb.NODE_STATUS_ONLINE
        assert got.last_heartbeat.metrics.p99_latency_ms == float(i * 100 + beats - 1)
    online = await harness.audit.ListAuditEvents(
        apb.ListAuditEventsRequest(filter=apb.AuditFilter(action="node.online"), page_size=1000)
    )
    assert sorted(e.resource for e in online.events) == sorted(f"node/{n.node_id}" for n in nodes)
    assert {e.actor for e in online.events} == {f"node:{n.node_id}" for n in nodes}


async def test_concurrent_reports_share_transactions_and_fail_alone(harness: Harness) -> None:
    """Reports from many nodes at once are committed together (group commit), each in
    order for its node; a bad report among them is refused alone and leaves nothing."""
    digest = await harness.upload(bundle({"a": b"fleet"}))
    never = await harness.upload(bundle({"a": b"never assigned"}))
    nodes = [await harness.register(f"n{i}") for i in range(20)]
    recs = [harness.open_watch(n) for n in nodes]
    await harness.assign(digest, selector="*")
    desired = [await rec.wait_digest(digest) for rec in recs]

    def report(i: int, phase: int, digest: str = digest) -> Any:
        req = npb.ReportStatusRequest(
            node_id=nodes[i].node_id,
            stream_id=recs[i].stream_id,
            revision=desired[i].revision,
            digest=digest,
            phase=phase,  # type: ignore[arg-type]
        )
        return harness.nodes.ReportStatus(req, metadata=nodes[i].metadata)

    async def converge(i: int) -> None:
        await report(i, npb.REPORT_PHASE_DOWNLOADED)
        await report(i, npb.REPORT_PHASE_ACTIVE)

    bad = [report(i, npb.REPORT_PHASE_ACTIVE, never) for i in range(0, 20, 5)]
    results = await asyncio.gather(*(converge(i) for i in range(20)), *bad, return_exceptions=True)
    assert all(r is None for r in results[:20]), results[:20]
    for r in results[20:]:
        assert isinstance(r, grpc.aio.AioRpcError) and r.code() == grpc.StatusCode.FAILED_PRECONDITION
    for node in nodes:
        got = (await harness.nodes.GetNode(npb.GetNodeRequest(node_id=node.node_id))).node
        assert got.applied_digest == digest
        assert got.last_report.phase == npb.REPORT_PHASE_ACTIVE
    applied = await harness.audit.ListAuditEvents(
        apb.ListAuditEventsRequest(filter=apb.AuditFilter(action="node.applied"), page_size=1000)
    )
    assert sorted(e.resource for e in applied.events) == sorted(f"node/{n.node_id}" for n in nodes)
    assert {e.actor for e in applied.events} == {f"node:{n.node_id}" for n in nodes}
    verified = await harness.audit.VerifyAuditChain(apb.VerifyAuditChainRequest())
    assert verified.ok, verified
    for rec in recs:
        await rec.cancel()


async def test_missed_heartbeats_mark_offline_and_a_heartbeat_brings_back(
    make_harness: HarnessFactory,
) -> None:
    harness = await make_harness(
        offline_after=timedelta(seconds=0.5), offline_sweep_interval=timedelta(seconds=0.1)
    )
    node = await harness.register("n1")
    await harness.nodes.Heartbeat(npb.HeartbeatRequest(node_id=node.node_id), metadata=node.metadata)

    async def status() -> int:
        return int((await harness.nodes.GetNode(npb.GetNodeRequest(node_id=node.node_id))).node.status)

    async def offline() -> None:
        assert await status() == npb.NODE_STATUS_OFFLINE

    await eventually(offline, timeout=10, what="node marked offline by the sweep")
    await harness.nodes.Heartbeat(npb.HeartbeatRequest(node_id=node.node_id), metadata=node.metadata)
    assert await status() == npb.NODE_STATUS_ONLINE


async def test_changing_labels_reroutes_the_watch(harness: Harness) -> None:
    prod = await harness.upload(bundle({"a": b"prod"}))
    dev = await harness.upload(bundle({"a": b"dev"}))
    await harness.assign(prod, selector="env=prod")
    await harness.assign(dev, selector="env=dev")
    node = await harness.register("n1", {"env": "dev"})
    rec = harness.open_watch(node)
    await rec.wait_digest(dev)
    reply = await harness.nodes.UpdateNodeLabels(
        npb.UpdateNodeLabelsRequest(node_id=node.node_id, labels={"env": "prod"})
    )
    assert reply.revision > 0
    assert reply.node.desired_digest == prod
    live = await rec.wait_digest(prod)
    assert live.revision == reply.revision
    await rec.cancel()


async def test_list_nodes_filters_by_selector_and_pages(harness: Harness) -> None:
    for i in range(5):
        await harness.register(f"n{i}", {"env": "prod" if i % 2 else "dev", "tier": "edge"})
    reply = await harness.nodes.ListNodes(
        npb.ListNodesRequest(project="default", selector="env=prod,tier=edge")
    )
    assert sorted(n.name for n in reply.nodes) == ["n1", "n3"]
    seen, token = [], ""
    while True:
        page = await harness.nodes.ListNodes(
            npb.ListNodesRequest(project="default", page_size=2, page_token=token)
        )
        seen += [n.name for n in page.nodes]
        token = page.next_page_token
        if not token:
            break
    assert sorted(seen) == [f"n{i}" for i in range(5)]


async def test_ack_and_nack_are_recorded(harness: Harness) -> None:
    good = await harness.upload(bundle({"a": b"good"}))
    bad = await harness.upload(bundle({"a": b"bad"}))
    node = await harness.register("n1")
    rec = harness.open_watch(node)
    await harness.assign(good, nodes=[node.node_id])
    desired = await rec.wait_digest(good)

    async def report(digest: str, revision: int, phase: npb.ReportPhase.ValueType, error: str = "") -> None:
        await harness.nodes.ReportStatus(
            npb.ReportStatusRequest(
                node_id=node.node_id,
                stream_id=rec.stream_id,
                revision=revision,
                digest=digest,
                phase=phase,
                error=error,
            ),
            metadata=node.metadata,
        )

    await report(good, desired.revision, npb.REPORT_PHASE_DOWNLOADED)
    await report(good, desired.revision, npb.REPORT_PHASE_ACTIVE)
    got = (await harness.nodes.GetNode(npb.GetNodeRequest(node_id=node.node_id))).node
    assert (got.applied_digest, got.applied_revision) == (good, desired.revision)
    assert got.desired_digest == good

    await harness.assign(bad, nodes=[node.node_id])
    nacked = await rec.wait_digest(bad)
    await report(bad, nacked.revision, npb.REPORT_PHASE_FAILED, "nginx -t: unknown directive")
    got = (await harness.nodes.GetNode(npb.GetNodeRequest(node_id=node.node_id))).node
    assert got.applied_digest == good  # still on the last good bundle
    assert got.failed_digest == bad
    assert "unknown directive" in got.failed_error
    assert got.last_report.phase == npb.REPORT_PHASE_FAILED
    # A replay of the same report is harmless.
    await report(bad, nacked.revision, npb.REPORT_PHASE_FAILED, "nginx -t: unknown directive")
    await rec.cancel()


async def test_a_batch_of_reports_is_written_in_a_few_statements(harness: Harness) -> None:
    """Reports committed together (group commit) are written with a few statements
    whatever the batch's size, not one UPDATE and one upsert per report; each node still
    ends as its reports leave it in order (DOWNLOADED then ACTIVE in one batch, FAILED),
    its xDS record the last one given."""
    app = harness.app
    first = await harness.upload(bundle({"a": b"first"}))
    second = await harness.upload(bundle({"a": b"second"}))
    nodes = [await harness.register(f"n{i}") for i in range(24)]
    recs = [harness.open_watch(n) for n in nodes]
    revision = await harness.assign(first, selector="*")
    for rec in recs:
        await rec.wait_digest(first)
    writes: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        reported = statement.startswith("UPDATE nodes SET") and "report_phase" in statement
        if reported or statement.startswith("INSERT INTO node_xds"):
            writes.append(statement)

    def report(i: int, digest: str, rev: int, phase: ReportPhase, xds: bool = False) -> Any:
        record = XdsRecord({"t": f"v{i}"}, rev, digest) if xds else None
        error = "refused" if phase is ReportPhase.FAILED else ""
        return app.nodes.report_status(nodes[i].node_id, recs[i].stream_id, rev, digest, phase, error, record)

    event.listen(app.engine.sync_engine, "before_cursor_execute", count)
    try:
        statements = []
        for batch in (range(3), range(3, 24)):
            writes.clear()
            await asyncio.gather(*(report(i, first, revision, ReportPhase.DOWNLOADED) for i in batch))
            statements.append(len(writes))
        assert statements == [1, 1]

        again = await harness.assign(second, selector="*")
        for rec in recs:
            await rec.wait_digest(second)
        writes.clear()
        calls = []
        for i in range(24):
            if i % 2:
                calls.append(report(i, second, again, ReportPhase.FAILED, xds=True))
            else:
                calls.append(report(i, second, again, ReportPhase.DOWNLOADED, xds=True))
                calls.append(report(i, second, again, ReportPhase.ACTIVE, xds=True))
        await asyncio.gather(*calls)
        # One UPDATE for the failed, one for the active, one upsert of every xDS record.
        assert len(writes) == 3, writes
    finally:
        event.remove(app.engine.sync_engine, "before_cursor_execute", count)
    for i, node in enumerate(nodes):
        got = (await harness.nodes.GetNode(npb.GetNodeRequest(node_id=node.node_id))).node
        if i % 2:
            assert (got.applied_digest, got.failed_digest) == ("", second)
            assert got.last_report.phase == npb.REPORT_PHASE_FAILED
        else:
            assert (got.applied_digest, got.applied_revision, got.failed_digest) == (second, again, "")
            assert got.last_report.phase == npb.REPORT_PHASE_ACTIVE
        recorded = await app.nodes.xds_record(node.node_id)
        assert recorded is not None and recorded.running_revision == again
    verified = await harness.audit.VerifyAuditChain(apb.VerifyAuditChainRequest())
    assert verified.ok, verified
    for rec in recs:
        await rec.cancel()
