"""Counts of the fleet for the metrics computed once from the database
(controlplane/tasks/fleet_metrics.py): three grouped counts, one read transaction."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select

from controlplane.store.schema import drift_events, nodes, rollouts
from controlplane.store.sql import SqlStore


@dataclass(frozen=True)
class FleetCounts:
    # (project, status, health) -> nodes
    nodes: dict[tuple[str, str, str], int]
    # (project, state) -> rollouts
    rollouts: dict[tuple[str, str], int]
    # project -> drift episodes not resolved
    drift_open: dict[str, int]


async def fleet_counts(store: SqlStore) -> FleetCounts:
    async with store.read() as tx:
        conn = tx.conn
        node_rows = await conn.execute(
            select(nodes.c.project, nodes.c.status, nodes.c.health, func.count()).group_by(
                nodes.c.project, nodes.c.status, nodes.c.health
            )
        )
        rollout_rows = await conn.execute(
            select(rollouts.c.project, rollouts.c.state, func.count()).group_by(
                rollouts.c.project, rollouts.c.state
            )
        )
        drift_rows = await conn.execute(
            select(drift_events.c.project, func.count())
            .where(drift_events.c.resolved_at.is_(None))
            .group_by(drift_events.c.project)
        )
        return FleetCounts(
            nodes={(p, s, h): n for p, s, h, n in node_rows},
            rollouts={(p, s): n for p, s, n in rollout_rows},
            drift_open={p: n for p, n in drift_rows},
        )
