"""Fleet gauges computed once from the database: nodes by status and health, rollouts
by state, drift episodes open.

Exactly one process across every replica and worker exports them: the holder of the
`fleet-metrics` lease, which recounts every few seconds. Every other process exports
none of these series, so `sum()` over all targets is the fleet's count, never the count
times the number of processes (docs/operations.md says which series are which).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client.core import REGISTRY, GaugeMetricFamily
from prometheus_client.registry import Collector

from controlplane.domain.leases import Leases
from controlplane.domain.model.leases import Lease
from controlplane.store.sql import SqlStore
from controlplane.store.stats import FleetCounts, fleet_counts

FLEET_LEASE = "fleet-metrics"


@dataclass
class FleetMetrics:
    """The counting job; `collect` (at scrape time) yields its series while the lease holds."""

    store: SqlStore
    leases: Leases
    counts: FleetCounts | None = None
    lease: Lease | None = field(default=None)

    async def run(self) -> None:
        lease = self.lease
        self.lease = await (
            self.leases.renew(lease) if lease is not None else self.leases.acquire(FLEET_LEASE)
        )
        if self.lease is None:
            self.counts = None
            return
        self.counts = await fleet_counts(self.store)

    async def release(self) -> None:
        lease, self.lease, self.counts = self.lease, None, None
        if lease is not None:
            with contextlib.suppress(Exception):
                await self.leases.release(lease)

    def exporting(self) -> FleetCounts | None:
        if self.lease is None or self.counts is None or not self.leases.valid(self.lease):
            return None
        return self.counts


class _Collector(Collector):
    """Yields the series of the first source that holds the lease (a test process may
    run several control planes)."""

    def __init__(self) -> None:
        self.sources: list[FleetMetrics] = []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts = next((c for c in (s.exporting() for s in self.sources) if c is not None), None)
        nodes = GaugeMetricFamily(
            "controlplane_fleet_nodes",
            "Nodes by project, status and reported health (computed once from the database).",
            labels=["project", "status", "health"],
        )
        rollouts = GaugeMetricFamily(
            "controlplane_rollouts",
            "Rollouts by project and state (computed once from the database).",
            labels=["project", "state"],
        )
        drift = GaugeMetricFamily(
            "controlplane_drift_episodes_open",
            "Nodes drifted past the grace period and not yet converged (computed once from the database).",
            labels=["project"],
        )
        if counts is not None:
            for (project, status, health), n in sorted(counts.nodes.items()):
                nodes.add_metric([project, status, health], n)
            for (project, state), n in sorted(counts.rollouts.items()):
                rollouts.add_metric([project, state], n)
            for project, n in sorted(counts.drift_open.items()):
                drift.add_metric([project], n)
        yield nodes
        yield rollouts
        yield drift


COLLECTOR = _Collector()
REGISTRY.register(COLLECTOR)
