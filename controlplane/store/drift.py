"""Drift episodes and per-project drift settings in SQL."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from controlplane.domain.model.drift import DriftEpisode, NodeApplied
from controlplane.domain.model.fleet import NodeStatus
from controlplane.store.schema import drift_events, drift_settings, nodes


def _episode(r: Any) -> DriftEpisode:
    return DriftEpisode(
        id=r.id,
        project=r.project,
        node_id=r.node_id,
        desired_digest=r.desired_digest,
        applied_digest=r.applied_digest,
        detected_at=r.detected_at,
        resolved_at=r.resolved_at,
        resolution=r.resolution,
        remediations=r.remediations,
        last_remediated_at=r.last_remediated_at,
    )


class SqlDrift:
    def __init__(self, conn: AsyncConnection):
        self._conn = conn

    async def nodes(self) -> list[NodeApplied]:
        query = select(nodes.c.id, nodes.c.project, nodes.c.status, nodes.c.applied_digest)
        return [
            NodeApplied(r.id, r.project, r.status == NodeStatus.ONLINE.value, r.applied_digest)
            for r in (await self._conn.execute(query)).all()
        ]

    async def open_episodes(self) -> list[DriftEpisode]:
        query = select(drift_events).where(drift_events.c.open_node_id.is_not(None))
        return [_episode(r) for r in (await self._conn.execute(query)).all()]

    async def insert(self, episode: DriftEpisode) -> None:
        # `open_node_id` is unique: a second open episode for the node fails here.
        await self._conn.execute(
            drift_events.insert().values(
                id=episode.id,
                project=episode.project,
                node_id=episode.node_id,
                open_node_id=episode.node_id,
                desired_digest=episode.desired_digest,
                applied_digest=episode.applied_digest,
                detected_at=episode.detected_at,
                resolution="",
                remediations=0,
            )
        )

    async def resolve(self, episode_id: str, at: datetime, resolution: str) -> bool:
        result = await self._conn.execute(
            update(drift_events)
            .where(drift_events.c.id == episode_id, drift_events.c.open_node_id.is_not(None))
            .values(open_node_id=None, resolved_at=at, resolution=resolution)
        )
        return result.rowcount == 1

    async def update_digests(self, episode_id: str, desired: str, applied: str) -> None:
        await self._conn.execute(
            update(drift_events)
            .where(drift_events.c.id == episode_id)
            .values(desired_digest=desired, applied_digest=applied)
        )

    async def count_remediation(self, episode_id: str, expected: int, at: datetime) -> bool:
        result = await self._conn.execute(
            update(drift_events)
            .where(
                drift_events.c.id == episode_id,
                drift_events.c.remediations == expected,
                drift_events.c.open_node_id.is_not(None),
            )
            .values(remediations=expected + 1, last_remediated_at=at)
        )
        return result.rowcount == 1

    async def page(self, project: str, open_only: bool, limit: int, before_id: str) -> list[DriftEpisode]:
        query = select(drift_events).where(drift_events.c.project == project)
        if open_only:
            query = query.where(drift_events.c.open_node_id.is_not(None))
        if before_id:
            anchor = (
                await self._conn.execute(
                    select(drift_events.c.detected_at).where(drift_events.c.id == before_id)
                )
            ).first()
            if anchor is not None:
                query = query.where(
                    or_(
                        drift_events.c.detected_at < anchor.detected_at,
                        and_(drift_events.c.detected_at == anchor.detected_at, drift_events.c.id < before_id),
                    )
                )
        query = query.order_by(drift_events.c.detected_at.desc(), drift_events.c.id.desc()).limit(limit)
        return [_episode(r) for r in (await self._conn.execute(query)).all()]

    async def remediating(self, project: str) -> bool:
        value = await self._conn.scalar(
            select(drift_settings.c.remediate).where(drift_settings.c.project == project)
        )
        return bool(value)

    async def remediating_projects(self) -> set[str]:
        query = select(drift_settings.c.project).where(drift_settings.c.remediate.is_(True))
        return {r.project for r in (await self._conn.execute(query)).all()}

    async def set_remediating(self, project: str, enabled: bool, at: datetime) -> None:
        updated = await self._conn.execute(
            update(drift_settings)
            .where(drift_settings.c.project == project)
            .values(remediate=enabled, updated_at=at)
        )
        if updated.rowcount == 0:
            await self._conn.execute(
                drift_settings.insert().values(project=project, remediate=enabled, updated_at=at)
            )
