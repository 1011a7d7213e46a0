"""Background work of rollouts: the driver, the watch feeder and the drift sweep, with
their Prometheus metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from prometheus_client import Counter, Gauge, Histogram

from controlplane.domain.audit.context import acting_as, system
from controlplane.domain.drift import DriftDetector
from controlplane.domain.leases import Leases
from controlplane.domain.model.leases import Lease
from controlplane.domain.ports import Store
from controlplane.domain.rollouts.bus import RolloutBus
from controlplane.domain.rollouts.driver import PassResult, RolloutDriver
from controlplane.domain.rollouts.watch import feed_bus
from controlplane.tasks.periodic import Periodic

log = logging.getLogger(__name__)

# Rollouts by state, and drift episodes open, are counted once from the database
# (tasks/fleet_metrics.py); these are this process's own.
LED = Gauge(
    "controlplane_rollouts_led",
    "Active rollouts whose lease this process holds.",
    multiprocess_mode="livesum",
)
ADVANCES = Counter("controlplane_rollouts_advances_total", "Driver ticks that changed a rollout.")
PASS_SECONDS = Histogram(
    "controlplane_rollouts_driver_pass_seconds",
    "Wall time of one driver pass over every active rollout.",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
DRIFT_DETECTED = Counter(
    "controlplane_drift_episodes_opened_total", "Drift episodes opened (one per node per episode)."
)
DRIFT_RESOLVED = Counter(
    "controlplane_drift_episodes_resolved_total", "Drift episodes resolved by convergence."
)
DRIFT_REMEDIATED = Counter(
    "controlplane_drift_remediations_total", "Desired states re-asserted by drift remediation."
)

DRIFT_LEASE = "drift-sweep"


def record_pass(result: PassResult) -> None:
    LED.set(result.led)
    ADVANCES.inc(result.advanced)
    PASS_SECONDS.observe(result.seconds)


class RolloutTasks:
    """Starts and stops the driver loop, the feeder of WatchRollout and the drift sweep."""

    def __init__(
        self,
        driver: RolloutDriver,
        store: Store,
        bus: RolloutBus,
        drift: DriftDetector,
        leases: Leases,
        drift_interval: float,
        feed_interval: float = 1.0,
    ):
        self.driver = driver
        self._drift = drift
        self._leases = leases
        self._drift_lease: Lease | None = None
        self._task: asyncio.Task[None] | None = None
        self._jobs = [
            # Cross-replica delivery to WatchRollout: one query a second for every watch.
            Periodic("rollout-feed", feed_interval, lambda: feed_bus(store, bus)),
            Periodic("drift-sweep", drift_interval, self.sweep_drift),
        ]

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.driver.run(), name="rollout-driver")
        for job in self._jobs:
            job.start()

    async def stop(self) -> None:
        for job in self._jobs:
            await job.stop()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.driver.stop()
        if self._drift_lease is not None:
            with contextlib.suppress(Exception):
                await self._leases.release(self._drift_lease)

    async def sweep_drift(self) -> None:
        """One sweep, on the one replica that holds the drift lease."""
        lease = self._drift_lease
        lease = await (self._leases.renew(lease) if lease is not None else self._leases.acquire(DRIFT_LEASE))
        self._drift_lease = lease
        if lease is None:
            return
        with acting_as(system("drift-sweep")):
            result = await self._drift.sweep()
        DRIFT_DETECTED.inc(result.opened)
        DRIFT_RESOLVED.inc(result.resolved)
        DRIFT_REMEDIATED.inc(result.remediated)
        if result.opened or result.resolved or result.remediated:
            log.info(
                "drift: %d open, %d new, %d resolved, %d remediated",
                result.open,
                result.opened,
                result.resolved,
                result.remediated,
            )
