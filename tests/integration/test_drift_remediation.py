"""Drift remediation decides on the watch hub's image of the desired state, and that
image can be a commit behind (this process's hub still reading the log, another
replica's NOTIFY not yet heard). A re-assertion must never bury what was written since:
the rolled-back bundle must not come back over a rollback's restore, and an operator's
pin must not be replaced by the assignment it overrode; nor does the stale row open an
episode. Remediation also waits out freeze windows. The revision lock that orders these
decisions also keeps a rollout's step and a rollback's restore from burying a pin
committed while they decide (PostgreSQL). Real agents (the simulator) over real gRPC;
SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from datetime import timedelta
from typing import TypeVar

import pytest
from sqlalchemy import text

from agent_stub.simulator import SimNode
from controlplane.api.rollout.v1 import drift_pb2
from controlplane.domain.audit.context import acting_as, system
from controlplane.domain.desired import write_assignment
from controlplane.domain.drift import DriftDetector, SweepResult
from controlplane.domain.kernel.clock import utcnow
from controlplane.domain.kernel.labels import node_key
from controlplane.domain.model.desired import Assignment, DesiredRow
from controlplane.domain.rollouts.bundles import assignable
from tests.conftest import HarnessFactory
from tests.integration.test_rollout_safety import at, freeze
from tests.support.eventually import eventually
from tests.support.harness import Harness
from tests.support.rollout_fleet import FAST, Rollouts, archive, fleet, pb, running

T = TypeVar("T")


class LaggingView:
    """The hub's image, except that the nodes `hold` names keep the rows it saw then:
    a view a commit (or a few) behind the log, as a lagging replica's hub is."""

    def __init__(self, plane: Harness):
        self._hub = plane.app.hub
        self._held: dict[str, DesiredRow | None] = {}

    def hold(self, node_ids: Iterable[str]) -> None:
        self._held = {n: self._hub.effective(n) for n in node_ids}

    def release(self) -> None:
        self._held = {}

    def effective(self, node_id: str) -> DesiredRow | None:
        if node_id in self._held:
            return self._held[node_id]
        return self._hub.effective(node_id)

    def head(self) -> int:
        return self._hub.head()

    async def wait_until(
        self, node_id: str | None, revision: int, within: float, epoch: str | None = None
    ) -> bool:
        return await self._hub.wait_until(node_id, revision, within, epoch)


async def without_driver(plane: Harness) -> Harness:
    # The test sweeps itself, with its own view; no driver either (it advances by hand).
    await plane.app.rollout_tasks.stop()
    return plane


@pytest.fixture
async def plane(make_harness: HarnessFactory) -> Harness:
    return await without_driver(await make_harness(**FAST))


@pytest.fixture
async def pg_plane(make_pg_harness: HarnessFactory) -> Harness:
    return await without_driver(await make_pg_harness(**FAST))


async def drifting(plane: Harness, node: SimNode) -> tuple[str, str]:
    """v1 assigned by selector and v2 uploaded, the node refusing both: it stays drifted."""
    v1 = await plane.upload(archive("v1"))
    v2 = await plane.upload(archive("v2"))
    node.rejects.update({v1, v2})
    await plane.assign(v1, selector="env=prod")
    return v1, v2


async def sweep(sweeper: DriftDetector) -> SweepResult:
    """One sweep, made as the system's drift sweeper makes it."""
    with acting_as(system("drift-sweep")):
        return await sweeper.sweep()


async def remediation_on(rollouts: Rollouts) -> None:
    await rollouts.drift.UpdateDriftSettings(
        drift_pb2.UpdateDriftSettingsRequest(project="default", remediate=True)
    )


async def latest_own_row(plane: Harness, node_id: str) -> DesiredRow:
    async with plane.app.store.read() as tx:
        return (await tx.desired.latest([node_key(node_id)]))[node_key(node_id)]


def detector(plane: Harness, view: LaggingView) -> DriftDetector:
    # No grace: the lagging image is the only thing between a sweep and a re-assertion.
    return DriftDetector(plane.app.store, utcnow, view, plane.app.hub.wake, grace=timedelta(0))


async def test_remediation_never_brings_a_rolled_back_bundle_back(plane: Harness) -> None:
    async with running(fleet(plane.address, plane.token, 1)) as sim:
        rollouts = Rollouts(plane.channel)
        node = sim.nodes[0]
        v0 = await plane.upload(archive("v0"))
        v1 = await plane.upload(archive("v1"))
        await plane.assign(v0, nodes=[node.node_id])

        async def on_v0() -> None:
            assert node.digest == v0

        await eventually(on_v0, what="the node on v0")
        node.rejects.add(v1)
        created = await rollouts.create(v1, strategy=pb.STRATEGY_ALL_AT_ONCE, gates=pb.HealthGates())
        with acting_as(system("test-driver")):
            await plane.app.rollouts.advance(created.id)  # start: step 0 writes v1
        assert (await latest_own_row(plane, node.node_id)).digest == v1
        await plane.app.hub.wait_until(None, (await rollouts.get(created.id)).steps[0].revision, 5.0)

        # The sweeper's image still shows the rollout's v1 when the rollback lands.
        view = LaggingView(plane)
        view.hold([node.node_id])
        assert view.effective(node.node_id) is not None
        await rollouts.stub.RollbackRollout(
            pb.RollbackRolloutRequest(project="default", rollout_id=created.id, reason="bad")
        )
        restored = await latest_own_row(plane, node.node_id)
        assert restored.digest == v0
        await remediation_on(rollouts)
        sweeper = detector(plane, view)
        result = await sweep(sweeper)
        # The image says the node (on v0) drifted from v1; the log says v0 decides: no
        # episode, no re-assertion.
        assert (result.opened, result.remediated) == (0, 0)
        assert await latest_own_row(plane, node.node_id) == restored

        # Once the image catches up the node is simply converged.
        view.release()
        result = await sweep(sweeper)
        assert (result.opened, result.open, result.remediated) == (0, 0, 0)
        assert await latest_own_row(plane, node.node_id) == restored
        assert node.digest == v0


async def test_remediation_never_replaces_a_newer_pin_and_waits_out_freezes(plane: Harness) -> None:
    async with running(fleet(plane.address, plane.token, 1)) as sim:
        rollouts = Rollouts(plane.channel)
        node = sim.nodes[0]
        _, v2 = await drifting(plane, node)
        await remediation_on(rollouts)
        view = LaggingView(plane)
        view.hold([node.node_id])
        pinned = await rollouts.stub.PinNode(
            pb.PinNodeRequest(project="default", node_id=node.node_id, digest=v2, reason="hotfix")
        )
        sweeper = detector(plane, view)
        result = await sweep(sweeper)
        assert (result.opened, result.remediated) == (0, 0)
        row = await latest_own_row(plane, node.node_id)
        assert (row.digest, row.pinned, row.revision) == (v2, True, pinned.revision)

        # Caught up, but frozen: nothing is re-asserted until the window goes.
        view.release()
        window = await freeze(
            rollouts, "change freeze", at(-timedelta(minutes=1)), at(timedelta(hours=1)), "holiday"
        )
        result = await sweep(sweeper)
        assert (result.opened, result.remediated) == (1, 0)  # drifted from the pin, frozen
        assert (await latest_own_row(plane, node.node_id)).revision == pinned.revision
        found = await rollouts.drift.ListDriftEvents(drift_pb2.ListDriftEventsRequest(project="default"))
        assert [(e.desired_digest, e.remediations) for e in found.events] == [(v2, 0)]
        await rollouts.stub.DeleteFreezeWindow(pb.DeleteFreezeWindowRequest(project="default", id=window.id))

        # Then the pin itself is re-asserted, still a pin.
        result = await sweep(sweeper)
        assert result.remediated == 1
        row = await latest_own_row(plane, node.node_id)
        assert (row.digest, row.pinned) == (v2, True) and row.revision > pinned.revision


async def test_an_open_episode_is_not_re_asserted_over_a_newer_pin(plane: Harness) -> None:
    """The episode is already open when the image falls behind: the check in the
    remediating transaction, not the one that opens episodes, is what keeps the pin."""
    async with running(fleet(plane.address, plane.token, 1)) as sim:
        rollouts = Rollouts(plane.channel)
        node = sim.nodes[0]
        v1, v2 = await drifting(plane, node)
        view = LaggingView(plane)
        sweeper = detector(plane, view)
        result = await sweep(sweeper)  # remediation still off: the episode opens, nothing else
        assert (result.opened, result.remediated) == (1, 0)

        view.hold([node.node_id])  # the image keeps showing v1 from here on
        pinned = await rollouts.stub.PinNode(
            pb.PinNodeRequest(project="default", node_id=node.node_id, digest=v2, reason="hotfix")
        )
        await remediation_on(rollouts)
        result = await sweep(sweeper)
        assert (result.open, result.remediated) == (1, 0)
        row = await latest_own_row(plane, node.node_id)
        assert (row.digest, row.pinned, row.revision) == (v2, True, pinned.revision)
        found = await rollouts.drift.ListDriftEvents(drift_pb2.ListDriftEventsRequest(project="default"))
        assert [(e.desired_digest, e.remediations) for e in found.events] == [(v1, 0)]

        # Caught up, the episode follows the pin and the pin is what gets re-asserted.
        view.release()
        result = await sweep(sweeper)
        assert result.remediated == 1
        row = await latest_own_row(plane, node.node_id)
        assert (row.digest, row.pinned) == (v2, True) and row.revision > pinned.revision


class HeldPin:
    """An operator's pin whose transaction has written it, holding the revision lock, and
    waits to commit: what a PostgreSQL writer deciding at the same moment can miss."""

    def __init__(self, plane: Harness, node_id: str, digest: str):
        self._plane, self._node_id, self.digest = plane, node_id, digest
        self._written, self._commit = asyncio.Event(), asyncio.Event()
        self.revision = 0

    async def _hold(self) -> None:
        async with self._plane.app.store.write() as tx:
            bundle = await assignable(tx, "default", self.digest)
            pin = Assignment(
                "default",
                (node_key(self._node_id),),
                bundle.digest,
                bundle.size_bytes,
                100,
                True,
                {"pin": "held"},
                bundle.signature,
                bundle.key_id,
            )
            self.revision = await write_assignment(tx, pin, utcnow().timestamp())
            self._written.set()
            await self._commit.wait()

    async def around(self, decide: Awaitable[T]) -> T:
        """Run `decide` while the pin is held; commit the pin once `decide` waits on a
        lock (whether before or after its reads is what the test tells apart)."""
        holder = asyncio.create_task(self._hold())
        await self._written.wait()
        deciding = asyncio.ensure_future(decide)

        async def waiting() -> None:
            async with self._plane.app.store.engine.connect() as conn:
                assert await conn.scalar(text("SELECT count(*) FROM pg_locks WHERE NOT granted"))

        await eventually(waiting, what="the other writer waiting on a lock")
        self._commit.set()
        await holder
        return await deciding


async def test_a_pin_committed_while_remediation_waits_is_not_buried(pg_plane: Harness) -> None:
    plane = pg_plane
    async with running(fleet(plane.address, plane.token, 1)) as sim:
        rollouts = Rollouts(plane.channel)
        node = sim.nodes[0]
        _, v2 = await drifting(plane, node)
        sweeper = detector(plane, LaggingView(plane))
        assert (await sweep(sweeper)).opened == 1
        await remediation_on(rollouts)
        held = HeldPin(plane, node.node_id, v2)
        result = await held.around(sweep(sweeper))
        assert result.remediated == 0
        row = await latest_own_row(plane, node.node_id)
        assert (row.digest, row.pinned, row.revision) == (v2, True, held.revision)


async def all_at_once_and_a_pin(plane: Harness, node: SimNode) -> tuple[Rollouts, pb.Rollout, HeldPin]:
    """An all-at-once rollout of v1 over the node, and an operator's pin of v2 on it, to hold."""
    rollouts = Rollouts(plane.channel)
    v1 = await plane.upload(archive("v1"))
    v2 = await plane.upload(archive("v2"))
    created = await rollouts.create(v1, strategy=pb.STRATEGY_ALL_AT_ONCE, gates=pb.HealthGates())
    return rollouts, created, HeldPin(plane, node.node_id, v2)


async def still_pinned(plane: Harness, node: SimNode, held: HeldPin) -> None:
    row = await latest_own_row(plane, node.node_id)
    assert (row.digest, row.pinned, row.revision) == (held.digest, True, held.revision)


async def test_a_pin_committed_while_a_step_waits_is_skipped(pg_plane: Harness) -> None:
    plane = pg_plane
    async with running(fleet(plane.address, plane.token, 1)) as sim:
        node = sim.nodes[0]
        rollouts, created, held = await all_at_once_and_a_pin(plane, node)
        with acting_as(system("test-driver")):
            assert await held.around(plane.app.rollouts.advance(created.id))  # step 0
        await still_pinned(plane, node, held)
        [recorded] = await rollouts.nodes(created.id)
        assert recorded.state == pb.NODE_STATE_SKIPPED and "pinned" in recorded.error


async def test_a_pin_committed_while_a_rollback_waits_is_left_pinned(pg_plane: Harness) -> None:
    """The restore reads each node's latest row to leave pins alone: under the revision
    lock, so a pin committing meanwhile is seen, not buried under the restore's write."""
    plane = pg_plane
    async with running(fleet(plane.address, plane.token, 1)) as sim:
        node = sim.nodes[0]
        rollouts, created, held = await all_at_once_and_a_pin(plane, node)
        with acting_as(system("test-driver")):
            assert await plane.app.rollouts.advance(created.id)  # step 0: v1 on the node's key
        with acting_as(system("test-operator")):
            rolled_back = await held.around(plane.app.rollouts.roll_back("default", created.id, "test"))
        assert rolled_back.rollout.state.value == "rolled_back"
        await still_pinned(plane, node, held)
        [recorded] = await rollouts.nodes(created.id)
        assert "pinned since the rollout wrote it" in recorded.error
