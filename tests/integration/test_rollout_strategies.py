"""Each strategy end to end: a control plane, a simulated fleet of real agents over real
gRPC, RolloutService and WatchRollout; on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

import pytest

from tests.conftest import HarnessFactory
from tests.support.clock import TestClock
from tests.support.eventually import eventually
from tests.support.harness import Harness
from tests.support.rollout_fleet import (
    FAST,
    STEADY,
    Rollouts,
    archive,
    canary_sampled,
    fleet,
    pb,
    running,
    seconds,
    watch_past_bakes,
)


@pytest.fixture
async def plane(make_harness: HarnessFactory) -> Harness:
    return await make_harness(**FAST)


def first_revision_with(node: object, digest: str) -> int:
    return next(o.revision for o in node.observed if o.digest == digest)  # type: ignore[attr-defined]


async def test_rolling_writes_batches_in_order_to_completion(plane: Harness) -> None:
    async with running(fleet(plane.address, plane.token, 7)) as sim:
        v1 = await plane.upload(archive("v1"))
        rollouts = Rollouts(plane.channel)
        created = await rollouts.create(v1, rolling=pb.RollingParams(batch_size=3))
        assert created.state in (pb.ROLLOUT_STATE_PENDING, pb.ROLLOUT_STATE_RUNNING)
        assert [s.node_count for s in created.steps] == [3, 3, 1]
        seen = await rollouts.watch(created.id)

        assert seen.snapshot is not None and seen.snapshot.id == created.id
        assert seen.last_state == pb.ROLLOUT_STATE_SUCCEEDED
        done = await rollouts.get(created.id)
        assert [s.state for s in done.steps] == [pb.STEP_STATE_DONE] * 3
        revisions = [s.revision for s in done.steps]
        assert revisions == sorted(revisions) and len(set(revisions)) == 3
        # Each step written exactly once, in order.
        writes = [e for e in await rollouts.events(created.id) if e.kind == "write"]
        assert [e.step for e in writes] == [0, 1, 2]
        # Every node got the bundle from its own step's revision, and runs it now.
        nodes = {n.node_id: n for n in await rollouts.nodes(created.id)}
        assert {n.state for n in nodes.values()} == {pb.NODE_STATE_ACTIVE}
        for node in sim.nodes:
            assert node.digest == v1
            assert first_revision_with(node, v1) == revisions[nodes[node.node_id].step]
        assert done.progress.nodes == {"active": 7}
        # The watch saw the whole history, numbered without gaps.
        assert [e.seq for e in seen.events] == list(range(seen.snapshot.event_seq + 1, done.event_seq + 1))


async def test_all_at_once_is_one_step(plane: Harness) -> None:
    async with running(fleet(plane.address, plane.token, 4)) as sim:
        v1 = await plane.upload(archive("v1"))
        rollouts = Rollouts(plane.channel)
        created = await rollouts.create(v1, strategy=pb.STRATEGY_ALL_AT_ONCE)
        assert len(created.steps) == 1 and created.steps[0].node_count == 4
        assert (await rollouts.watch(created.id)).last_state == pb.ROLLOUT_STATE_SUCCEEDED
        assert {n.digest for n in sim.nodes} == {v1}


async def test_canary_promotes_through_cumulative_steps(make_harness: HarnessFactory) -> None:
    """Bakes are cut short by moving the server's clock past them (nodes go offline
    after a day, gates call a beat stale after 3 s): an analysed step's once its canary
    nodes sent the heartbeats the analysis needs, so no analysis waits for samples."""
    clock = TestClock()
    plane = await make_harness(clock=clock, **{**STEADY, "gate_stale_after": FAST["offline_after"]})
    async with running(fleet(plane.address, plane.token, 10)) as sim:
        v1 = await plane.upload(archive("v1"))
        rollouts = Rollouts(plane.channel)
        created = await rollouts.create(
            v1,
            strategy=pb.STRATEGY_CANARY,
            canary=pb.CanaryParams(steps_percent=[10, 50, 100], analysis=pb.CanaryAnalysis(min_sample=2)),
            bake_time=seconds(2),
        )
        assert [s.node_count for s in created.steps] == [1, 4, 5]

        sampled = canary_sampled(plane, rollouts, created.id, v1, 2)
        seen = await watch_past_bakes(rollouts, created.id, clock, timedelta(seconds=2), sampled)
        assert seen.last_state == pb.ROLLOUT_STATE_SUCCEEDED, seen.messages("state")
        done = await rollouts.get(created.id)
        analyses = [a for s in done.steps for a in s.analyses]
        # A slow machine may see too few heartbeats in a bake: that analysis extends it,
        # and only for that reason.
        assert all(a.canary_samples < 2 for a in analyses if a.decision == "extend"), analyses
        decided = [a for a in analyses if a.decision != "extend"]
        assert [a.decision for a in decided] == ["promote", "promote"]
        assert all(a.canary_samples >= 2 for a in decided)
        assert {n.digest for n in sim.nodes} == {v1}


async def test_blue_green_shifts_weight_on_the_watch_then_swaps(plane: Harness) -> None:
    async with running(fleet(plane.address, plane.token, 4)) as sim:
        v1 = await plane.upload(archive("v1"))
        rollouts = Rollouts(plane.channel)
        first = await rollouts.create(v1, strategy=pb.STRATEGY_ALL_AT_ONCE)
        await rollouts.watch(first.id)
        v2 = await plane.upload(archive("v2"))
        created = await rollouts.create(
            v2, strategy=pb.STRATEGY_BLUE_GREEN, blue_green=pb.BlueGreenParams(traffic_steps_percent=[25, 50])
        )
        assert [(s.kind, s.traffic_weight) for s in created.steps] == [
            (pb.STEP_KIND_DEPLOY, 0),
            (pb.STEP_KIND_TRAFFIC, 25),
            (pb.STEP_KIND_TRAFFIC, 50),
            (pb.STEP_KIND_SWAP, 100),
        ]
        assert (await rollouts.watch(created.id)).last_state == pb.ROLLOUT_STATE_SUCCEEDED
        roles = {n.node_id: n.role for n in await rollouts.nodes(created.id)}
        green = [n for n in sim.nodes if roles[n.node_id] == "target"]
        blue = [n for n in sim.nodes if roles[n.node_id] == "live"]
        assert len(green) == len(blue) == 2
        # What each node was told on its watch, weight by weight.
        for node in green:
            weights = [o.traffic_weight for o in node.observed if o.digest == v2]
            assert weights == [0, 25, 50, 100], weights
            assert node.digest == v2
        for node in blue:
            weights = [o.traffic_weight for o in node.observed if o.digest == v1]
            assert weights[-3:] == [75, 50, 0], weights
            assert node.digest == v1  # the old set stays as the standby


async def test_blue_green_instant_rollback_puts_all_weight_back_on_the_old_set(plane: Harness) -> None:
    """Rolled back mid traffic shift, every node is told — on its watch, in one revision —
    to run the old bundle at full weight: the live set gets its weight back, the new set
    goes back to the old bundle."""
    async with running(fleet(plane.address, plane.token, 4)) as sim:
        v1 = await plane.upload(archive("v1"))
        rollouts = Rollouts(plane.channel)
        first = await rollouts.create(v1, strategy=pb.STRATEGY_ALL_AT_ONCE)
        assert (await rollouts.watch(first.id)).last_state == pb.ROLLOUT_STATE_SUCCEEDED
        v2 = await plane.upload(archive("v2"))
        created = await rollouts.create(
            v2,
            strategy=pb.STRATEGY_BLUE_GREEN,
            blue_green=pb.BlueGreenParams(traffic_steps_percent=[25, 50]),
            bake_time=seconds(1),
        )

        async def shifting() -> None:
            assert (await rollouts.get(created.id)).progress.current_step >= 1

        # Hold it mid shift: paused once traffic has started to move.
        await eventually(shifting, timeout=30, what="traffic moving to the new set")
        paused = (
            await rollouts.stub.PauseRollout(pb.PauseRolloutRequest(project="default", rollout_id=created.id))
        ).rollout
        weight = paused.steps[paused.progress.current_step].traffic_weight
        assert weight in (25, 50), paused.progress
        roles = {n.node_id: n.role for n in await rollouts.nodes(created.id)}
        green = [n for n in sim.nodes if roles[n.node_id] == "target"]
        blue = [n for n in sim.nodes if roles[n.node_id] == "live"]
        assert len(green) == len(blue) == 2

        async def split() -> None:
            assert {(n.digest, n.traffic_weight) for n in green} == {(v2, weight)}
            assert {(n.digest, n.traffic_weight) for n in blue} == {(v1, 100 - weight)}

        await eventually(split, timeout=15, what=f"the new set at {weight} %")

        back = await rollouts.stub.RollbackRollout(
            pb.RollbackRolloutRequest(project="default", rollout_id=created.id, reason="instant rollback")
        )
        assert back.rollout.state == pb.ROLLOUT_STATE_ROLLED_BACK

        async def restored() -> None:
            last = {n.node_id: n.observed[-1] for n in sim.nodes}
            assert {(o.digest, o.traffic_weight) for o in last.values()} == {(v1, 100)}, last
            assert {n.digest for n in sim.nodes} == {v1}

        await eventually(restored, timeout=15, what="all weight back on the old set")
        # One revision told every node at once.
        assert len({n.observed[-1].revision for n in sim.nodes}) == 1


async def test_blue_green_on_one_node_keeps_it_serving(plane: Harness) -> None:
    async with running(fleet(plane.address, plane.token, 1)) as sim:
        v1 = await plane.upload(archive("v1"))
        rollouts = Rollouts(plane.channel)
        created = await rollouts.create(
            v1, strategy=pb.STRATEGY_BLUE_GREEN, blue_green=pb.BlueGreenParams(traffic_steps_percent=[10, 50])
        )
        assert [(s.kind, s.traffic_weight) for s in created.steps] == [(pb.STEP_KIND_DEPLOY, 100)]
        assert (await rollouts.watch(created.id)).last_state == pb.ROLLOUT_STATE_SUCCEEDED
        node = sim.nodes[0]
        assert node.digest == v1 and [o.traffic_weight for o in node.observed if o.digest == v1] == [100]
