from __future__ import annotations

import functools
from collections.abc import Collection, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import and_, bindparam, delete, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from controlplane.domain.kernel.labels import Selector
from controlplane.domain.model.fleet import (
    METRIC_NAMES,
    Enrollment,
    Health,
    HeartbeatRecord,
    Node,
    NodeMetrics,
    NodeStatus,
    ReportPhase,
    StatusReport,
    XdsRecord,
)
from controlplane.store.schema import node_heartbeats, node_labels, node_xds, nodes, revision_counter

# Envoy's words on a NACK, as the node's report error is bounded.
MAX_NACK_TEXT = 4096


# A metric the node did not report is NULL, never 0.0 (records.NodeMetrics).
def row_metrics(row: Any) -> NodeMetrics:
    return NodeMetrics(Health(row.health), *(getattr(row, m) for m in METRIC_NAMES))


def _metric_values(m: NodeMetrics) -> dict[str, Any]:
    return {"health": m.health.value, **{name: getattr(m, name) for name in METRIC_NAMES}}


def _node(row: Any) -> Node:
    beat = (
        HeartbeatRecord(row.last_heartbeat_at, row_metrics(row), row.heartbeat_digest)
        if row.last_heartbeat_at is not None
        else None
    )
    report = (
        StatusReport(
            row.report_stream_id,
            row.report_revision,
            row.report_digest,
            ReportPhase(row.report_phase),
            row.report_error or "",
            row.reported_at,
        )
        if row.report_phase
        else None
    )
    return Node(
        id=row.id,
        project=row.project,
        name=row.name,
        labels=dict(row.labels),
        status=NodeStatus(row.status),
        registered_at=row.registered_at,
        agent_version=row.agent_version,
        hostname=row.hostname,
        last_heartbeat=beat,
        applied_digest=row.applied_digest,
        applied_revision=row.applied_revision,
        last_report=report,
        failed_digest=row.failed_digest,
        failed_revision=row.failed_revision,
        failed_error=row.failed_error,
        address=row.address or "",
        enrollment=Enrollment(row.enrollment),
        labels_by_operator=bool(row.labels_by_operator),
    )


# NOTIFY channel of recorded status reports: a wake-up for every replica's rollout driver.
REPORTS_CHANNEL = "controlplane_reports"

# Executed with one parameter set per node: the keys name the columns to set.
_BEAT_UPDATE = update(nodes).where(nodes.c.id == bindparam("b_id"))


@functools.cache
def _ring_upsert(dialect: str) -> Any:
    """INSERT … ON CONFLICT (node_id, slot) DO UPDATE, in the dialect's own construct, built
    once per dialect."""
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    stmt = insert(node_heartbeats)
    changing = [c.name for c in node_heartbeats.columns if c.name not in ("node_id", "slot")]
    return stmt.on_conflict_do_update(
        index_elements=["node_id", "slot"], set_={name: stmt.excluded[name] for name in changing}
    )


_WITH_CREDENTIAL = select(nodes, select(revision_counter.c.value).scalar_subquery().label("log_head")).where(
    nodes.c.id == bindparam("n_id")
)

# Executed with one parameter set per node: the keys name the columns to set.
_REPORT_UPDATE = update(nodes).where(nodes.c.id == bindparam("r_id"))


def _report_values(report: StatusReport) -> dict[str, Any]:
    """The node's columns a report sets: what it reported, and what it runs (ACTIVE) or
    refused (FAILED)."""
    values: dict[str, Any] = {
        "report_stream_id": report.stream_id,
        "report_revision": report.revision,
        "report_digest": report.digest,
        "report_phase": report.phase.value,
        "report_error": report.error,
        "reported_at": report.reported_at,
    }
    if report.phase is ReportPhase.ACTIVE:
        values |= {
            "applied_digest": report.digest,
            "applied_revision": report.revision,
            "failed_digest": "",
            "failed_revision": 0,
            "failed_error": "",
        }
    elif report.phase is ReportPhase.FAILED:
        values |= {
            "failed_digest": report.digest,
            "failed_revision": report.revision,
            "failed_error": report.error,
        }
    return values


def _xds_values(node_id: str, xds: XdsRecord, at: datetime) -> dict[str, Any]:
    return {
        "node_id": node_id,
        "acked": dict(xds.acked),
        "running_revision": xds.running_revision,
        "running_digest": xds.running_digest,
        "nack_revision": xds.nack_revision,
        "nack_type_url": xds.nack_type_url[:200],
        "nack_error": xds.nack_error[:MAX_NACK_TEXT],
        "recorded_at": at,
    }


@functools.cache
def _xds_upsert(dialect: str) -> Any:
    """INSERT … ON CONFLICT (node_id) DO UPDATE of every column, built once per dialect."""
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    stmt = insert(node_xds)
    changing = [c.name for c in node_xds.columns if c.name != "node_id"]
    return stmt.on_conflict_do_update(
        index_elements=["node_id"], set_={name: stmt.excluded[name] for name in changing}
    )


class SqlNodes:
    def __init__(self, conn: AsyncConnection):
        self._conn = conn

    async def get(self, node_id: str) -> Node | None:
        row = (await self._conn.execute(select(nodes).where(nodes.c.id == node_id))).first()
        return _node(row) if row else None

    async def get_many(self, node_ids: Collection[str], for_update: bool = False) -> list[Node]:
        """`for_update`: lock the rows (PostgreSQL), in id order like heartbeats, so the
        two never deadlock."""
        ids = sorted(set(node_ids))
        found: list[Node] = []
        for start in range(0, len(ids), 500):
            query = select(nodes).where(nodes.c.id.in_(ids[start : start + 500])).order_by(nodes.c.id)
            if for_update:
                query = query.with_for_update(of=nodes)
            found.extend(_node(r) for r in (await self._conn.execute(query)).all())
        return found

    async def in_project(self, project: str, node_ids: Collection[str]) -> set[str]:
        """Those of `node_ids` that are nodes of `project`, in one query per 500 ids."""
        ids = list(node_ids)
        found: set[str] = set()
        for start in range(0, len(ids), 500):
            query = select(nodes.c.id).where(
                nodes.c.project == project, nodes.c.id.in_(ids[start : start + 500])
            )
            found.update((await self._conn.scalars(query)).all())
        return found

    async def get_by_name(self, project: str, name: str) -> Node | None:
        query = select(nodes).where(nodes.c.project == project, nodes.c.name == name)
        row = (await self._conn.execute(query)).first()
        return _node(row) if row else None

    async def insert(self, node: Node, credential_hash: str) -> None:
        await self._conn.execute(
            nodes.insert().values(
                id=node.id,
                project=node.project,
                name=node.name,
                labels=dict(node.labels),
                credential_hash=credential_hash,
                status=node.status.value,
                registered_at=node.registered_at,
                agent_version=node.agent_version,
                hostname=node.hostname,
                address=node.address,
                enrollment=node.enrollment.value,
                labels_by_operator=node.labels_by_operator,
            )
        )
        await self._write_labels(node.id, node.labels)

    async def update_registration(
        self,
        node_id: str,
        labels: Mapping[str, str],
        credential_hash: str,
        agent_version: str,
        hostname: str,
        address: str = "",
        enrollment: Enrollment = Enrollment.REGISTERED,
    ) -> None:
        await self._conn.execute(
            update(nodes)
            .where(nodes.c.id == node_id)
            .values(
                labels=dict(labels),
                credential_hash=credential_hash,
                agent_version=agent_version,
                hostname=hostname,
                address=address,
                enrollment=enrollment.value,
                labels_by_operator=False,
            )
        )
        await self._write_labels(node_id, labels)

    async def set_labels(self, node_id: str, labels: Mapping[str, str], by_operator: bool) -> None:
        await self._conn.execute(
            update(nodes)
            .where(nodes.c.id == node_id)
            .values(labels=dict(labels), labels_by_operator=by_operator)
        )
        await self._write_labels(node_id, labels)

    async def set_agent_version(self, node_id: str, agent_version: str) -> None:
        await self._conn.execute(
            update(nodes).where(nodes.c.id == node_id).values(agent_version=agent_version)
        )

    async def _write_labels(self, node_id: str, labels: Mapping[str, str]) -> None:
        await self._conn.execute(delete(node_labels).where(node_labels.c.node_id == node_id))
        if labels:
            await self._conn.execute(
                node_labels.insert(), [{"node_id": node_id, "key": k, "value": v} for k, v in labels.items()]
            )

    async def credential_hash(self, node_id: str) -> str | None:
        value = await self._conn.scalar(select(nodes.c.credential_hash).where(nodes.c.id == node_id))
        return str(value) if value is not None else None

    async def with_credential(self, node_id: str) -> tuple[Node, str, int] | None:
        """The node, its credential hash and the desired-state log's head, in one
        statement: one snapshot, so the head is never newer than the credential."""
        row = (await self._conn.execute(_WITH_CREDENTIAL, {"n_id": node_id})).first()
        return (_node(row), str(row.credential_hash), int(row.log_head or 0)) if row else None

    async def record_heartbeats(
        self, beats: Sequence[tuple[str, HeartbeatRecord]], history_size: int
    ) -> dict[str, NodeStatus]:
        """Store a batch of beats (in order; a node may appear more than once) in a few
        statements: the nodes' latest metrics and each beat in its node's ring of
        `history_size` slots. Returns each known node's status before the batch; beats of
        unknown nodes are skipped."""
        ids = sorted({node_id for node_id, _ in beats})
        known: dict[str, tuple[NodeStatus, int]] = {}
        for start in range(0, len(ids), 500):
            # FOR UPDATE (PostgreSQL): the sequence numbers below are read, then written.
            query = (
                select(nodes.c.id, nodes.c.status, nodes.c.heartbeat_seq)
                .where(nodes.c.id.in_(ids[start : start + 500]))
                .order_by(nodes.c.id)
                .with_for_update()
            )
            for r in (await self._conn.execute(query)).all():
                known[r.id] = (NodeStatus(r.status), int(r.heartbeat_seq))
        seqs = {node_id: seq for node_id, (_, seq) in known.items()}
        latest: dict[str, dict[str, Any]] = {}
        ring: list[dict[str, Any]] = []
        for node_id, beat in beats:
            if node_id not in seqs:
                continue
            seqs[node_id] = seq = seqs[node_id] + 1
            values = _metric_values(beat.metrics)
            latest[node_id] = {
                "b_id": node_id,
                "status": NodeStatus.ONLINE.value,
                "last_heartbeat_at": beat.received_at,
                "heartbeat_digest": beat.applied_digest,
                "heartbeat_seq": seq,
                **values,
            }
            ring.append(
                {
                    "node_id": node_id,
                    "slot": seq % history_size,
                    "seq": seq,
                    "received_at": beat.received_at,
                    "applied_digest": beat.applied_digest,
                    **values,
                }
            )
        if latest:
            await self._conn.execute(_BEAT_UPDATE, list(latest.values()))
            await self._conn.execute(_ring_upsert(self._conn.dialect.name), ring)
        return {node_id: status for node_id, (status, _) in known.items()}

    async def announce_reports(self) -> None:
        if self._conn.dialect.name == "postgresql":  # SQLite: one process, woken in-process
            await self._conn.execute(text(f"NOTIFY {REPORTS_CHANNEL}"))

    async def record_reports(self, reports: Sequence[tuple[str, StatusReport]]) -> None:
        """Store a batch of checked reports (in order; a node may appear more than once)
        in a few statements, whatever the batch's size: each node's columns as its last
        report leaves them, one UPDATE per distinct set of columns (three at most), and
        its last xDS record in one upsert."""
        latest: dict[str, dict[str, Any]] = {}
        xds: dict[str, dict[str, Any]] = {}
        for node_id, report in reports:
            latest.setdefault(node_id, {"r_id": node_id}).update(_report_values(report))
            if report.xds is not None:
                xds[node_id] = _xds_values(node_id, report.xds, report.reported_at)
        by_columns: dict[frozenset[str], list[dict[str, Any]]] = {}
        for node_id in sorted(latest):  # id order, like every other batch of node rows
            values = latest[node_id]
            by_columns.setdefault(frozenset(values), []).append(values)
        for rows in by_columns.values():
            await self._conn.execute(_REPORT_UPDATE, rows)
        if xds:
            await self._conn.execute(_xds_upsert(self._conn.dialect.name), [xds[n] for n in sorted(xds)])

    async def xds(self, node_id: str) -> XdsRecord | None:
        row = (await self._conn.execute(select(node_xds).where(node_xds.c.node_id == node_id))).first()
        if row is None:
            return None
        return XdsRecord(
            dict(row.acked),
            row.running_revision,
            row.running_digest,
            row.nack_revision,
            row.nack_type_url,
            row.nack_error,
            row.recorded_at,
        )

    async def page(
        self, project: str, selector: Selector | None, status: NodeStatus | None, limit: int, after_id: str
    ) -> list[Node]:
        query = select(nodes).where(nodes.c.project == project, nodes.c.id > after_id)
        if status is not None:
            query = query.where(nodes.c.status == status.value)
        for key, value in selector.terms if selector else ():
            query = query.where(
                nodes.c.id.in_(
                    select(node_labels.c.node_id).where(
                        and_(node_labels.c.key == key, node_labels.c.value == value)
                    )
                )
            )
        rows = (await self._conn.execute(query.order_by(nodes.c.id).limit(limit))).all()
        return [_node(r) for r in rows]

    async def heartbeats(self, node_id: str) -> list[HeartbeatRecord]:
        query = (
            select(node_heartbeats)
            .where(node_heartbeats.c.node_id == node_id)
            .order_by(node_heartbeats.c.seq.desc())
        )
        rows = (await self._conn.execute(query)).all()
        return [HeartbeatRecord(r.received_at, row_metrics(r), r.applied_digest) for r in rows]

    async def mark_offline(self, cutoff: datetime) -> list[tuple[str, str]]:
        stale = and_(
            nodes.c.status == NodeStatus.ONLINE.value,
            nodes.c.last_heartbeat_at < cutoff,
        )
        # PostgreSQL: lock in id order, as a heartbeat batch does, and skip the rows a
        # batch holds (those nodes are beating right now), so the two never deadlock.
        silent = select(nodes.c.id).where(stale).order_by(nodes.c.id).with_for_update(skip_locked=True)
        result = await self._conn.execute(
            update(nodes)
            .where(nodes.c.id.in_(silent.scalar_subquery()))
            .values(status=NodeStatus.OFFLINE.value)
            .returning(nodes.c.id, nodes.c.project)
        )
        return sorted((r.id, r.project) for r in result.all())
