"""Rollouts in SQL: rollouts, steps, per-node progress, claims, approvals, events, and
the node facts and heartbeat samples the driver reads."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import and_, bindparam, delete, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from controlplane.domain.model.facts import NodeFacts
from controlplane.domain.model.fleet import HeartbeatRecord, NodeStatus
from controlplane.domain.model.rollouts import (
    ACTIVE_STATES,
    Approval,
    NodeState,
    Role,
    Rollout,
    RolloutEvent,
    RolloutNode,
    RolloutSpec,
    RolloutState,
    Step,
    StepKind,
    StepState,
)
from controlplane.store.nodes import row_metrics
from controlplane.store.schema import (
    node_heartbeats,
    node_labels,
    nodes,
    rollout_approvals,
    rollout_claims,
    rollout_events,
    rollout_nodes,
    rollout_steps,
    rollouts,
)

# Ids per `IN (...)`: far below either database's parameter limit.
_CHUNK = 500


def _chunks(items: Sequence[str]) -> list[Sequence[str]]:
    return [items[i : i + _CHUNK] for i in range(0, len(items), _CHUNK)]


def _rollout(row: Any) -> Rollout:
    return Rollout(
        id=row.id,
        project=row.project,
        spec=RolloutSpec.from_json(row.spec),
        state=RolloutState(row.state),
        created_by=row.created_by,
        created_at=row.created_at,
        updated_at=row.updated_at,
        reason=row.reason,
        started_at=row.started_at,
        finished_at=row.finished_at,
        paused_at=row.paused_at,
        current_step=row.current_step,
        version=row.version,
        event_seq=row.event_seq,
        progress=row.progress or {},
    )


def _rollout_values(r: Rollout) -> dict[str, Any]:
    return {
        "state": r.state.value,
        "reason": r.reason,
        "started_at": r.started_at,
        "finished_at": r.finished_at,
        "paused_at": r.paused_at,
        "updated_at": r.updated_at,
        "current_step": r.current_step,
        "version": r.version,
        "event_seq": r.event_seq,
        "progress": dict(r.progress),
    }


def _step(row: Any) -> Step:
    return Step(
        index=row.idx,
        kind=StepKind(row.kind),
        state=StepState(row.state),
        traffic_weight=row.traffic_weight,
        node_count=row.node_count,
        revision=row.revision,
        started_at=row.started_at,
        applied_at=row.applied_at,
        bake_started_at=row.bake_started_at,
        finished_at=row.finished_at,
        gate_failing_since=row.gate_failing_since,
        paused_seconds=row.paused_seconds,
        extensions=row.extensions,
        detail=row.detail or {},
    )


def _step_values(s: Step) -> dict[str, Any]:
    return {
        "kind": s.kind.value,
        "state": s.state.value,
        "traffic_weight": s.traffic_weight,
        "node_count": s.node_count,
        "revision": s.revision,
        "started_at": s.started_at,
        "applied_at": s.applied_at,
        "bake_started_at": s.bake_started_at,
        "finished_at": s.finished_at,
        "gate_failing_since": s.gate_failing_since,
        "paused_seconds": s.paused_seconds,
        "extensions": s.extensions,
        "detail": dict(s.detail),
    }


def _node(row: Any) -> RolloutNode:
    return RolloutNode(
        node_id=row.node_id,
        step=row.step,
        role=Role(row.role),
        state=NodeState(row.state),
        previous_digest=row.previous_digest,
        previous_key_digest=row.previous_key_digest,
        previous_weight=row.previous_weight,
        assigned_revision=row.assigned_revision,
        error=row.error,
        updated_at=row.updated_at,
    )


def _node_values(n: RolloutNode, at: datetime) -> dict[str, Any]:
    return {
        "step": n.step,
        "role": n.role.value,
        "state": n.state.value,
        "previous_digest": n.previous_digest,
        "previous_key_digest": n.previous_key_digest,
        "previous_weight": n.previous_weight,
        "assigned_revision": n.assigned_revision,
        "error": n.error,
        "updated_at": n.updated_at or at,
    }


def _event(row: Any) -> RolloutEvent:
    return RolloutEvent(
        rollout_id=row.rollout_id,
        seq=row.seq,
        at=row.at,
        kind=row.kind,
        state=RolloutState(row.state),
        message=row.message,
        step=row.step,
        node_id=row.node_id,
        detail=row.detail or {},
    )


class SqlRollouts:
    def __init__(self, conn: AsyncConnection):
        self._conn = conn

    async def insert(self, rollout: Rollout, steps: Sequence[Step], nodes_: Sequence[RolloutNode]) -> None:
        await self._conn.execute(
            rollouts.insert().values(
                id=rollout.id,
                project=rollout.project,
                bundle_digest=rollout.spec.bundle_digest,
                selector=rollout.spec.selector,
                strategy=rollout.spec.strategy.value,
                spec=rollout.spec.to_json(),
                created_by=rollout.created_by,
                created_at=rollout.created_at,
                scheduled_at=rollout.spec.scheduled_at,
                **_rollout_values(rollout),
            )
        )
        await self.save_steps(rollout.id, steps, insert=True)
        await self.save_nodes(rollout.id, nodes_, insert=True, at=rollout.created_at)

    async def get(self, rollout_id: str) -> Rollout | None:
        row = (await self._conn.execute(select(rollouts).where(rollouts.c.id == rollout_id))).first()
        return _rollout(row) if row else None

    async def steps(self, rollout_id: str) -> list[Step]:
        query = (
            select(rollout_steps)
            .where(rollout_steps.c.rollout_id == rollout_id)
            .order_by(rollout_steps.c.idx)
        )
        return [_step(r) for r in (await self._conn.execute(query)).all()]

    async def nodes(self, rollout_id: str) -> list[RolloutNode]:
        query = (
            select(rollout_nodes)
            .where(rollout_nodes.c.rollout_id == rollout_id)
            .order_by(rollout_nodes.c.node_id)
        )
        return [_node(r) for r in (await self._conn.execute(query)).all()]

    async def node_page(
        self, rollout_id: str, step: int | None, limit: int, after_node_id: str
    ) -> list[RolloutNode]:
        query = select(rollout_nodes).where(
            rollout_nodes.c.rollout_id == rollout_id, rollout_nodes.c.node_id > after_node_id
        )
        if step is not None:
            query = query.where(rollout_nodes.c.step == step)
        rows = (await self._conn.execute(query.order_by(rollout_nodes.c.node_id).limit(limit))).all()
        return [_node(r) for r in rows]

    async def page(
        self, project: str, states: Collection[RolloutState], limit: int, before_id: str
    ) -> list[Rollout]:
        query = select(rollouts).where(rollouts.c.project == project)
        if states:
            query = query.where(rollouts.c.state.in_([s.value for s in states]))
        if before_id:
            anchor = (
                await self._conn.execute(select(rollouts.c.created_at).where(rollouts.c.id == before_id))
            ).first()
            if anchor is not None:
                query = query.where(
                    or_(
                        rollouts.c.created_at < anchor.created_at,
                        and_(rollouts.c.created_at == anchor.created_at, rollouts.c.id < before_id),
                    )
                )
        query = query.order_by(rollouts.c.created_at.desc(), rollouts.c.id.desc()).limit(limit)
        return [_rollout(r) for r in (await self._conn.execute(query)).all()]

    async def active(self) -> list[tuple[str, int]]:
        query = select(rollouts.c.id, rollouts.c.version).where(
            rollouts.c.state.in_([s.value for s in ACTIVE_STATES])
        )
        return [(r.id, r.version) for r in (await self._conn.execute(query)).all()]

    async def save(self, rollout: Rollout, expected_version: int) -> bool:
        result = await self._conn.execute(
            update(rollouts)
            .where(rollouts.c.id == rollout.id, rollouts.c.version == expected_version)
            .values(**_rollout_values(rollout))
        )
        return result.rowcount == 1

    async def save_steps(self, rollout_id: str, steps: Sequence[Step], insert: bool = False) -> None:
        if not steps:
            return
        if insert:
            await self._conn.execute(
                rollout_steps.insert(),
                [{"rollout_id": rollout_id, "idx": s.index, **_step_values(s)} for s in steps],
            )
            return
        for s in steps:
            await self._conn.execute(
                update(rollout_steps)
                .where(rollout_steps.c.rollout_id == rollout_id, rollout_steps.c.idx == s.index)
                .values(**_step_values(s))
            )

    async def save_nodes(
        self, rollout_id: str, nodes_: Sequence[RolloutNode], insert: bool = False, at: datetime | None = None
    ) -> None:
        if not nodes_:
            return
        stamp = at or max((n.updated_at for n in nodes_ if n.updated_at), default=None)
        assert stamp is not None
        rows = [{"b_node_id": n.node_id, **_node_values(n, stamp)} for n in nodes_]
        if insert:
            await self._conn.execute(
                rollout_nodes.insert(),
                [{"rollout_id": rollout_id, "node_id": r.pop("b_node_id"), **r} for r in rows],
            )
            return
        # One statement executed for many parameter sets (executemany).
        statement = (
            update(rollout_nodes)
            .where(
                rollout_nodes.c.rollout_id == rollout_id, rollout_nodes.c.node_id == bindparam("b_node_id")
            )
            .values({k: bindparam(k) for k in rows[0] if k != "b_node_id"})
        )
        await self._conn.execute(statement, rows)

    async def add_events(self, events: Sequence[RolloutEvent]) -> None:
        if not events:
            return
        await self._conn.execute(
            rollout_events.insert(),
            [
                {
                    "rollout_id": e.rollout_id,
                    "seq": e.seq,
                    "at": e.at,
                    "kind": e.kind,
                    "step": e.step,
                    "node_id": e.node_id,
                    "state": e.state.value,
                    "message": e.message,
                    "detail": dict(e.detail),
                }
                for e in events
            ],
        )

    async def events(self, rollout_id: str, after_seq: int, limit: int) -> list[RolloutEvent]:
        query = (
            select(rollout_events)
            .where(rollout_events.c.rollout_id == rollout_id, rollout_events.c.seq > after_seq)
            .order_by(rollout_events.c.seq)
            .limit(limit)
        )
        return [_event(r) for r in (await self._conn.execute(query)).all()]

    async def event_seqs(self, rollout_ids: Collection[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        for part in _chunks(sorted(rollout_ids)):
            query = select(rollouts.c.id, rollouts.c.event_seq).where(rollouts.c.id.in_(part))
            out.update({r.id: r.event_seq for r in (await self._conn.execute(query)).all()})
        return out

    async def claims(self, node_ids: Collection[str]) -> dict[str, str]:
        out: dict[str, str] = {}
        for part in _chunks(sorted(node_ids)):
            query = select(rollout_claims).where(rollout_claims.c.node_id.in_(part))
            out.update({r.node_id: r.rollout_id for r in (await self._conn.execute(query)).all()})
        return out

    async def claim(self, rollout_id: str, node_ids: Collection[str]) -> None:
        if node_ids:
            await self._conn.execute(
                rollout_claims.insert(), [{"node_id": n, "rollout_id": rollout_id} for n in node_ids]
            )

    async def release(self, rollout_id: str) -> None:
        await self._conn.execute(delete(rollout_claims).where(rollout_claims.c.rollout_id == rollout_id))

    async def claimed(self, node_ids: Collection[str] | None = None) -> set[str]:
        if node_ids is not None:
            return set(await self.claims(node_ids))
        return {r.node_id for r in (await self._conn.execute(select(rollout_claims.c.node_id))).all()}

    async def approvals(self, rollout_id: str) -> list[Approval]:
        query = (
            select(rollout_approvals)
            .where(rollout_approvals.c.rollout_id == rollout_id)
            .order_by(rollout_approvals.c.at)
        )
        return [Approval(r.actor, r.at, r.comment) for r in (await self._conn.execute(query)).all()]

    async def add_approval(self, rollout_id: str, approval: Approval) -> None:
        await self._conn.execute(
            rollout_approvals.insert().values(
                rollout_id=rollout_id, actor=approval.actor, at=approval.at, comment=approval.comment
            )
        )

    async def node_facts(self, node_ids: Collection[str]) -> list[NodeFacts]:
        out: list[NodeFacts] = []
        for part in _chunks(sorted(node_ids)):
            query = select(nodes).where(nodes.c.id.in_(part))
            for r in (await self._conn.execute(query)).all():
                beat = None
                if r.last_heartbeat_at is not None:
                    metrics = row_metrics(r)
                    beat = HeartbeatRecord(r.last_heartbeat_at, metrics, r.heartbeat_digest)
                out.append(
                    NodeFacts(
                        node_id=r.id,
                        online=r.status == NodeStatus.ONLINE.value,
                        applied_digest=r.applied_digest,
                        applied_revision=r.applied_revision,
                        failed_digest=r.failed_digest,
                        failed_revision=r.failed_revision,
                        failed_error=r.failed_error,
                        reported_at=r.reported_at,
                        heartbeat=beat,
                    )
                )
        return out

    async def heartbeat_samples(
        self, node_ids: Collection[str], since: datetime
    ) -> dict[str, list[HeartbeatRecord]]:
        out: dict[str, list[HeartbeatRecord]] = {}
        for part in _chunks(sorted(node_ids)):
            query = select(node_heartbeats).where(
                node_heartbeats.c.node_id.in_(part), node_heartbeats.c.received_at > since
            )
            for r in (await self._conn.execute(query.order_by(node_heartbeats.c.seq))).all():
                metrics = row_metrics(r)
                out.setdefault(r.node_id, []).append(
                    HeartbeatRecord(r.received_at, metrics, r.applied_digest)
                )
        return out

    async def target_nodes(self, project: str, selector_terms: Sequence[tuple[str, str]]) -> list[str]:
        query = select(nodes.c.id).where(nodes.c.project == project)
        for key, value in selector_terms:
            query = query.where(
                nodes.c.id.in_(
                    select(node_labels.c.node_id).where(
                        node_labels.c.key == key, node_labels.c.value == value
                    )
                )
            )
        return [r.id for r in (await self._conn.execute(query.order_by(nodes.c.id))).all()]
