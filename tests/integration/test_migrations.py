"""The migrations build exactly the schema the code declares, on both databases."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, text

from controlplane.domain.audit import chain, trail
from controlplane.domain.kernel.labels import Selector
from controlplane.domain.model import audit as audit_model
from controlplane.domain.model.fleet import Enrollment, Health, HeartbeatRecord, NodeMetrics
from controlplane.store.engine import make_engine, upgrade
from controlplane.store.schema import audit_log, metadata, node_heartbeats, node_labels, nodes, projects
from controlplane.store.sql import SqlStore
from tests.integration.test_audit_seal_migration import downgrade


def _diff(conn: Connection) -> list[Any]:
    context = MigrationContext.configure(conn, opts={"compare_type": True})
    return list(compare_metadata(context, metadata))


async def test_migrations_match_the_schema(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        await upgrade(engine)
        async with engine.connect() as conn:
            diff = await conn.run_sync(_diff)
        assert diff == []
    finally:
        await engine.dispose()


async def test_upgrade_is_idempotent(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        await upgrade(engine)
        await upgrade(engine)
    finally:
        await engine.dispose()


async def test_a_chain_from_before_head_seals_is_sealed_by_its_next_entry(database_url: str) -> None:
    """0006 adds the head's seal but cannot compute it (no key): the head starts unsealed,
    verification says so, and the next audited write seals it behind an `audit.seal`
    entry, after which the old entries and the new verify as one chain."""
    key = b"k" * 32
    engine = make_engine(database_url)
    try:
        await upgrade(engine, "0005")
        mac = chain.GENESIS
        async with engine.begin() as conn:
            for seq in (1, 2, 3):
                entry = audit_model.AuditEntry(
                    seq,
                    f"2026-01-0{seq}T00:00:00.000000+00:00",
                    "system:test",
                    "test.old",
                    f"x/{seq}",
                    "",
                    None,
                    None,
                    "",
                )
                mac = chain.chain_mac(key, entry, mac)
                await conn.execute(
                    audit_log.insert().values(
                        seq=seq,
                        at=entry.at,
                        actor=entry.actor,
                        action=entry.action,
                        resource=entry.resource,
                        project="",
                        before=None,
                        after=None,
                        request_id="",
                        mac=mac,
                    )
                )
            await conn.execute(text("UPDATE audit_head SET seq = 3, mac = :mac"), {"mac": mac})
        await upgrade(engine)
        store = SqlStore(engine, key)
        unsealed = await trail.verify(store, key)
        assert not unsealed.ok and "not sealed" in unsealed.reason
        async with store.write() as tx:
            await tx.audit.record("test.new", "x/4")
        report = await trail.verify(store, key)
        assert report.ok, report.reason
        assert report.entries == report.head_seq == 5
        async with store.read() as tx:
            found = [(e.seq, e.action, e.after) async for e in tx.audit.entries()]
        assert found[3:] == [(4, chain.SEAL_ACTION, {"unsealed_head_seq": 3}), (5, "test.new", None)]
    finally:
        await engine.dispose()


async def test_metric_presence_keeps_the_rows_it_migrates(database_url: str) -> None:
    """0007 makes heartbeat metrics nullable. Nodes, their labels and their heartbeat
    history written before it keep every value (on SQLite the table is recreated, and a
    careless recreate cascades the node's labels and history away), and afterwards a
    beat without metrics is stored as absent, not 0.0."""
    at = datetime(2026, 3, 1, tzinfo=UTC)
    metrics = {
        "health": "healthy",
        "error_rate": 0.02,
        "p99_latency_ms": 35.0,
        "cpu_percent": 0.0,
        "memory_percent": 61.5,
        "requests_per_second": 120.0,
    }
    engine = make_engine(database_url)
    try:
        await upgrade(engine, "0006")
        async with engine.begin() as conn:
            await conn.execute(projects.insert().values(name="default", created_at=at))
            await conn.execute(
                nodes.insert().values(
                    id="n-1",
                    project="default",
                    name="edge-1",
                    labels={"env": "prod"},
                    credential_hash="h" * 64,
                    status="online",
                    registered_at=at,
                    agent_version="",
                    hostname="",
                    last_heartbeat_at=at,
                    heartbeat_digest="",
                    heartbeat_seq=2,
                    applied_digest="",
                    applied_revision=0,
                    failed_digest="",
                    failed_revision=0,
                    failed_error="",
                    **metrics,
                )
            )
            await conn.execute(node_labels.insert().values(node_id="n-1", key="env", value="prod"))
            for seq in (1, 2):
                await conn.execute(
                    node_heartbeats.insert().values(
                        node_id="n-1", slot=seq, seq=seq, received_at=at, applied_digest="", **metrics
                    )
                )
        await upgrade(engine)
        store = SqlStore(engine, b"k" * 32)
        kept = NodeMetrics(Health.HEALTHY, 0.02, 35.0, 0.0, 61.5, 120.0)
        async with store.read() as tx:
            node = await tx.nodes.get("n-1")
            history = await tx.nodes.heartbeats("n-1")
            labelled = await tx.nodes.page("default", Selector.parse("env=prod"), None, 10, "")
        assert node is not None and node.last_heartbeat is not None
        assert node.last_heartbeat.metrics == kept and dict(node.labels) == {"env": "prod"}
        assert [b.metrics for b in history] == [kept, kept]
        assert [n.id for n in labelled] == ["n-1"]

        async with store.write() as tx:
            await tx.nodes.record_heartbeats([("n-1", HeartbeatRecord(at, NodeMetrics(), ""))], 60)
        async with store.read() as tx:
            node = await tx.nodes.get("n-1")
            history = await tx.nodes.heartbeats("n-1")
        assert node is not None and node.last_heartbeat is not None
        assert node.last_heartbeat.metrics == NodeMetrics()
        assert history[0].metrics == NodeMetrics() and history[0].metrics.error_rate is None
        assert [b.metrics for b in history[1:]] == [kept, kept]
    finally:
        await engine.dispose()


async def test_node_enrollment_moves_from_the_agent_version_marker_to_its_field(database_url: str) -> None:
    """0014 makes how a node was enrolled a field: a node marked by the old agent version
    `xds (enrolled on first contact)` becomes `xds_first_contact` with no agent version
    (its next contact says what it runs); every other node is `registered`, its agent
    version kept; no node's labels are the operator's. Downgrading puts the marker back."""
    at = datetime(2026, 3, 1, tzinfo=UTC)
    engine = make_engine(database_url)

    def row(node_id: str, name: str, agent_version: str) -> dict[str, Any]:
        return {
            "id": node_id,
            "project": "default",
            "name": name,
            "labels": {"env": "prod"},
            "credential_hash": "h" * 64,
            "status": "offline",
            "registered_at": at,
            "agent_version": agent_version,
            "hostname": "",
            "heartbeat_digest": "",
            "heartbeat_seq": 0,
            "applied_digest": "",
            "applied_revision": 0,
            "failed_digest": "",
            "failed_revision": 0,
            "failed_error": "",
        }

    try:
        await upgrade(engine, "0013")
        async with engine.begin() as conn:
            await conn.execute(projects.insert().values(name="default", created_at=at))
            await conn.execute(nodes.insert().values(row("n-1", "edge-1", "xds (enrolled on first contact)")))
            await conn.execute(nodes.insert().values(row("n-2", "agent-1", "agent 1.2.3")))
            await conn.execute(nodes.insert().values(row("n-3", "envoy-1", "envoy")))
        await upgrade(engine)
        store = SqlStore(engine, b"k" * 32)
        async with store.read() as tx:
            found = {n.id: n for n in await tx.nodes.get_many(["n-1", "n-2", "n-3"])}
        assert {k: (n.enrollment, n.agent_version, n.labels_by_operator) for k, n in found.items()} == {
            "n-1": (Enrollment.XDS_FIRST_CONTACT, "", False),
            "n-2": (Enrollment.REGISTERED, "agent 1.2.3", False),
            "n-3": (Enrollment.REGISTERED, "envoy", False),
        }

        await downgrade(engine, "0013")
        async with engine.connect() as conn:
            rows = (await conn.execute(text("SELECT id, agent_version FROM nodes"))).all()
        versions = {r.id: r.agent_version for r in rows}
        assert versions == {"n-1": "xds (enrolled on first contact)", "n-2": "agent 1.2.3", "n-3": "envoy"}
    finally:
        await engine.dispose()
