"""Drift against real (simulated) agents: one episode per node however many sweeps see
it, a metric, the list RPC, remediation per project that re-asserts the desired state
(never for a node an active rollout holds, never more than a few times), and automatic
resolution once the node converges. SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from prometheus_client import REGISTRY

from controlplane.api.rollout.v1 import drift_pb2
from tests.conftest import HarnessFactory
from tests.support.clock import TestClock
from tests.support.harness import Harness
from tests.support.rollout_fleet import FAST, Rollouts, archive, drift_sweeps, fleet, pb, running

# Drift is judged on the server's clock, which these tests move: an hour's grace is
# passed by a jump, not waited for. Sweeps run every tenth of a second of real time, and
# the tests wait for whole sweeps (`drift_sweeps`), never for an interval.
GRACE = timedelta(hours=1)


@pytest.fixture
def clock() -> TestClock:
    return TestClock()


@pytest.fixture
async def plane(make_harness: HarnessFactory, clock: TestClock) -> Harness:
    return await make_harness(
        clock=clock,
        **{
            **FAST,
            "drift_grace": GRACE,
            "drift_interval": timedelta(seconds=0.1),
            "offline_after": timedelta(days=1),
            "fleet_metrics_interval": timedelta(seconds=0.2),
        },
    )


def counter(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


async def _open_gauge() -> bool:
    return (REGISTRY.get_sample_value("controlplane_drift_episodes_open", {"project": "default"}) or 0) >= 1


async def episodes(rollouts: Rollouts, open_only: bool = False) -> list[drift_pb2.DriftEvent]:
    reply = await rollouts.drift.ListDriftEvents(
        drift_pb2.ListDriftEventsRequest(project="default", open_only=open_only)
    )
    return list(reply.events)


async def until(check, timeout: float = 20.0, what: str = "condition"):  # type: ignore[no-untyped-def]
    for _ in range(int(timeout * 10)):
        value = await check()
        if value:
            return value
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what} not reached within {timeout}s")


async def test_one_episode_per_drift_resolved_on_convergence(plane: Harness, clock: TestClock) -> None:
    async with running(fleet(plane.address, plane.token, 2)) as sim:
        rollouts = Rollouts(plane.channel)
        stuck = sim.nodes[0]
        v1 = await plane.upload(archive("v1"))
        stuck.rejects.add(v1)
        opened_before = counter("controlplane_drift_episodes_opened_total")
        await plane.assign(v1, selector="env=prod")
        await until(lambda: _refused(stuck, v1), what="the node refusing the bundle")
        await drift_sweeps(plane.app, 2)  # sweeps see the mismatch (the grace runs from then): no episode yet
        assert await episodes(rollouts) == []
        clock.advance(GRACE)
        found = await until(lambda: episodes(rollouts), what="a drift episode")
        assert [e.node_id for e in found] == [stuck.node_id]
        assert found[0].desired_digest == v1 and found[0].applied_digest == ""
        # Sweeps keep seeing it: still one episode, one count.
        await drift_sweeps(plane.app, 3)
        assert len(await episodes(rollouts)) == 1
        assert counter("controlplane_drift_episodes_opened_total") - opened_before == 1
        # Counted from the database by the one process holding the fleet-metrics lease.
        await until(_open_gauge, what="the open-episodes gauge")
        settings = await rollouts.drift.GetDriftSettings(drift_pb2.GetDriftSettingsRequest(project="default"))
        assert not settings.remediate
        assert found[0].remediations == 0

        # Converging (a new assignment the node accepts) resolves it.
        stuck.rejects.clear()
        await plane.assign(v1, nodes=[stuck.node_id])
        resolved = await until(lambda: _resolved(rollouts), what="the episode resolved")
        assert resolved.resolution == "converged" and resolved.node_id == stuck.node_id
        assert await episodes(rollouts, open_only=True) == []


async def _resolved(rollouts: Rollouts) -> drift_pb2.DriftEvent | None:
    return next((e for e in await episodes(rollouts) if e.resolved_at.seconds), None)


async def test_remediation_reasserts_the_desired_state_once_per_attempt(
    plane: Harness, clock: TestClock
) -> None:
    async with running(fleet(plane.address, plane.token, 2)) as sim:
        rollouts = Rollouts(plane.channel)
        stuck = sim.nodes[0]
        v1 = await plane.upload(archive("v1"))
        stuck.rejects.add(v1)
        await plane.assign(v1, selector="env=prod")
        await until(lambda: _refused(stuck, v1), what="the node refusing the bundle")
        await drift_sweeps(plane.app, 2)  # a sweep sees the mismatch first: the grace runs from then
        clock.advance(GRACE)
        await until(lambda: episodes(rollouts), what="a drift episode")

        # A rollout holding the node (awaiting approval) keeps remediation away from it.
        waiting = await rollouts.create(v1, strategy=pb.STRATEGY_ALL_AT_ONCE, approvals_required=1)
        await rollouts.drift.UpdateDriftSettings(
            drift_pb2.UpdateDriftSettingsRequest(project="default", remediate=True)
        )
        clock.advance(GRACE)
        await drift_sweeps(plane.app, 3)  # sweeps past the grace: still none for a held node
        assert (await episodes(rollouts))[0].remediations == 0
        assert sum(1 for o in stuck.observed if o.digest == v1) == 1
        await rollouts.stub.CancelRollout(pb.CancelRolloutRequest(project="default", rollout_id=waiting.id))

        # Free again: re-asserted, at most a few times however long it stays stuck.
        first = await until(lambda: _remediated(rollouts, 1), what="a remediation")
        assert first.remediations == 1
        await drift_sweeps(plane.app, 3)  # one per grace period, however many sweeps
        assert (await episodes(rollouts))[0].remediations == 1
        clock.advance(GRACE)
        await until(lambda: _remediated(rollouts, 2), what="a second remediation")
        assert sum(1 for o in stuck.observed if o.digest == v1) >= 2
        stuck.rejects.clear()
        clock.advance(GRACE)  # the next re-assertion is the one the node now takes
        resolved = await until(lambda: _resolved(rollouts), timeout=30, what="convergence after remediation")
        assert resolved.resolution == "converged" and 2 <= resolved.remediations <= 3
        assert stuck.digest == v1
        assert len(await episodes(rollouts)) == 1


async def _refused(node: Any, digest: str) -> bool:
    return any(o.digest == digest for o in node.observed)


async def _remediated(rollouts: Rollouts, count: int) -> drift_pb2.DriftEvent | None:
    found = await episodes(rollouts)
    return found[0] if found and found[0].remediations >= count else None
