"""When rollouts go wrong: canary analysis on bad metrics, gates on stale data, NACKs
against the failure budget, offline nodes against max_unavailable, the step deadline,
pause and resume, and manual rollback — each against a simulated fleet of real agents,
checking what every node ends up running. SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from agent_stub.simulator import FleetSimulator, MetricsProfile
from controlplane.api.bundle.v1 import bundle_pb2
from controlplane.api.node.v1 import node_pb2
from tests.conftest import HarnessFactory
from tests.support.clock import TestClock
from tests.support.eventually import eventually
from tests.support.harness import Harness
from tests.support.rollout_fleet import (
    FAST,
    STEADY,
    Rollouts,
    archive,
    bad,
    driver_passes,
    fleet,
    pb,
    running,
    seconds,
    watch_past_bakes,
)


@pytest.fixture
async def plane(make_harness: HarnessFactory) -> Harness:
    return await make_harness(**FAST)


async def everyone_on(rollouts: Rollouts, digest: str) -> str:
    """Move the whole fleet to `digest` with a plain rollout (the baseline for a test)."""
    created = await rollouts.create(digest, selector="*", strategy=pb.STRATEGY_ALL_AT_ONCE)
    assert (await rollouts.watch(created.id)).last_state == pb.ROLLOUT_STATE_SUCCEEDED
    return digest


async def settle(sim: FleetSimulator, digest: str, timeout: float = 15.0) -> None:
    """Every running simulated node runs `digest` (a rollback converging)."""
    for _ in range(int(timeout * 10)):
        if {n.digest for n in sim.nodes if n.running} == {digest}:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"fleet did not settle on {digest}: {[n.digest for n in sim.nodes]}")


async def test_canary_rolls_back_on_bad_metrics_from_the_simulator(plane: Harness) -> None:
    async with running(fleet(plane.address, plane.token, 10)) as sim:
        rollouts = Rollouts(plane.channel)
        v1 = await everyone_on(rollouts, await plane.upload(archive("v1")))
        v2 = await plane.upload(archive("v2"))
        sim.set_bundle_metrics(v2, bad(error_rate=0.3))
        created = await rollouts.create(
            v2,
            strategy=pb.STRATEGY_CANARY,
            canary=pb.CanaryParams(steps_percent=[10, 50, 100], analysis=pb.CanaryAnalysis(min_sample=2)),
            gates=pb.HealthGates(),
            bake_time=seconds(2),
        )
        seen = await rollouts.watch(created.id)
        assert seen.last_state == pb.ROLLOUT_STATE_ROLLED_BACK
        done = await rollouts.get(created.id)
        assert "canary analysis at step 0" in done.reason and "error rate" in done.reason
        assert done.steps[0].analyses[-1].decision == "rollback"
        assert done.steps[0].analyses[-1].canary_error_rate > 0.2
        assert done.steps[0].analyses[-1].baseline_samples >= 2
        await settle(sim, v1)
        # Only the canary ever heard of v2.
        told = [n for n in sim.nodes if any(o.digest == v2 for o in n.observed)]
        assert len(told) == 1


# The gates' staleness in both cases below.
STALE = timedelta(seconds=3)


@pytest.mark.parametrize(
    "staleness",
    [
        # Stale once the node would be marked offline (the default), 3 s here; the
        # offline sweep never runs, so the silent node stays ONLINE.
        {"offline_after": STALE, "offline_sweep_interval": timedelta(minutes=10)},
        # A gate window of its own (--gate-stale-after), far shorter than offline_after.
        {"offline_after": timedelta(minutes=10), "gate_stale_after": STALE},
    ],
    ids=["offline-after", "gate-stale-after"],
)
async def test_gates_fail_on_stale_metrics_while_the_node_stays_online(
    make_harness: HarnessFactory, staleness: dict[str, timedelta]
) -> None:
    # A node that goes silent keeps status ONLINE: only the age of its last heartbeat
    # (past the gates' staleness) can fail it. The server's clock is moved past the
    # staleness and then past the failure window, instead of waiting for both: the
    # others beat again within a second of each jump, the silent node never does.
    clock = TestClock()
    plane = await make_harness(clock=clock, **{**FAST, **staleness})
    async with running(fleet(plane.address, plane.token, 3)) as sim:
        rollouts = Rollouts(plane.channel)
        v1 = await everyone_on(rollouts, await plane.upload(archive("v1")))
        v2 = await plane.upload(archive("v2"))
        created = await rollouts.create(
            v2, strategy=pb.STRATEGY_ALL_AT_ONCE, bake_time=seconds(30), gate_failure_window=seconds(2)
        )
        await rollouts.watch(created.id, until=[pb.ROLLOUT_STATE_RUNNING])
        for _ in range(100):
            rollout = await rollouts.get(created.id)
            if (
                rollout.steps[0].state == pb.STEP_STATE_BAKING
                and "3 node(s) healthy" in rollout.steps[0].gates
            ):
                break
            await asyncio.sleep(0.1)
        assert "3 node(s) healthy" in rollout.steps[0].gates, rollout.steps[0].gates
        # A node goes silent while the step bakes: no more heartbeats, no more metrics.
        silent = sim.nodes[0].node_id
        await sim.stop_node(0)
        clock.advance(STALE)

        async def failing() -> None:
            gates = (await rollouts.get(created.id)).steps[0].gates
            assert f"{silent}: last heartbeat" in gates, gates

        await eventually(failing, what="the gates failing on the silent node")
        clock.advance(timedelta(seconds=2.5))  # past the failure window
        seen = await rollouts.watch(created.id)
        assert seen.last_state == pb.ROLLOUT_STATE_ROLLED_BACK
        reason = (await rollouts.get(created.id)).reason
        assert "health gates failing" in reason and f"{silent}: last heartbeat" in reason, reason
        status = (await plane.nodes.GetNode(node_pb2.GetNodeRequest(node_id=silent))).node.status
        assert status == node_pb2.NODE_STATUS_ONLINE, "stale metrics, not an offline node, failed the gate"
        history = await rollouts.events(created.id)
        assert any(e.kind == "gates" and "gates failing" in e.message for e in history)
        await settle(sim, v1)


async def test_gates_fail_on_metrics_the_nodes_do_not_report(make_harness: HarnessFactory) -> None:
    """Healthy nodes that send no error rate (a broken metrics source) do not pass a
    max_error_rate gate: the rollout fails its gates naming the metric and rolls back.
    The node shows the metric absent, not 0.0. The server's clock is moved past the
    failure window (heartbeats stay fresh across the jump: only the metric fails)."""
    clock = TestClock()
    plane = await make_harness(clock=clock, **STEADY)
    no_errors = MetricsProfile(error_rate=None)
    async with running(fleet(plane.address, plane.token, 3, metrics=no_errors)) as sim:
        rollouts = Rollouts(plane.channel)
        # The default gate (a healthy heartbeat) needs only the health they do report.
        v1 = await everyone_on(rollouts, await plane.upload(archive("v1")))
        v2 = await plane.upload(archive("v2"))
        created = await rollouts.create(
            v2,
            strategy=pb.STRATEGY_ALL_AT_ONCE,
            gates=pb.HealthGates(require_healthy=True, max_error_rate=0.05),
            bake_time=seconds(30),
            gate_failure_window=seconds(2),
        )

        async def beaten() -> None:
            # Every node beat since it activated v2: the gates see its metrics.
            for node in await rollouts.nodes(created.id):
                assert node.state == pb.NODE_STATE_ACTIVE, node
                got = (await plane.nodes.GetNode(node_pb2.GetNodeRequest(node_id=node.node_id))).node
                beat = got.last_heartbeat.received_at.ToDatetime()
                assert beat > node.updated_at.ToDatetime(), (beat, node.updated_at)

        await eventually(beaten, what="a heartbeat from every node since it activated v2")
        assert "failing" in (await rollouts.get(created.id)).steps[0].gates  # since before the jump
        clock.advance(timedelta(seconds=2.5))  # past the failure window
        seen = await rollouts.watch(created.id)
        assert seen.last_state == pb.ROLLOUT_STATE_ROLLED_BACK
        reason = (await rollouts.get(created.id)).reason
        assert "health gates failing" in reason and "no error_rate reported" in reason, reason
        node = (await plane.nodes.GetNode(node_pb2.GetNodeRequest(node_id=sim.nodes[0].node_id))).node
        metrics = node.last_heartbeat.metrics
        assert metrics.health == node_pb2.HEALTH_STATUS_HEALTHY
        assert not metrics.HasField("error_rate") and metrics.HasField("p99_latency_ms")
        history = await plane.nodes.ListHeartbeats(node_pb2.ListHeartbeatsRequest(node_id=node.id))
        assert history.heartbeats and not any(h.metrics.HasField("error_rate") for h in history.heartbeats)
        listed = await plane.nodes.ListNodes(node_pb2.ListNodesRequest(project="default"))
        assert listed.nodes and not any(n.last_heartbeat.metrics.HasField("error_rate") for n in listed.nodes)
        await settle(sim, v1)


async def test_nacks_count_against_the_failure_budget(plane: Harness) -> None:
    async with running(fleet(plane.address, plane.token, 4)) as sim:
        rollouts = Rollouts(plane.channel)
        v1 = await everyone_on(rollouts, await plane.upload(archive("v1")))
        v2 = await plane.upload(archive("v2"))
        ids = sorted(n.node_id for n in sim.nodes)
        by_id = {n.node_id: n for n in sim.nodes}
        by_id[ids[0]].rejects.add(v2)
        # One NACK is within a budget of one: the rollout goes on without that node.
        ok = await rollouts.create(v2, rolling=pb.RollingParams(batch_size=2), max_failures=1)
        assert (await rollouts.watch(ok.id)).last_state == pb.ROLLOUT_STATE_SUCCEEDED
        nodes = {n.node_id: n for n in await rollouts.nodes(ok.id)}
        assert nodes[ids[0]].state == pb.NODE_STATE_FAILED and "rejects" in nodes[ids[0]].error
        assert by_id[ids[0]].digest == v1 and {by_id[i].digest for i in ids[1:]} == {v2}

        v3 = await plane.upload(archive("v3"))
        for node in sim.nodes:
            node.rejects.add(v3)
        failing = await rollouts.create(v3, rolling=pb.RollingParams(batch_size=2), max_failures=1)
        assert (await rollouts.watch(failing.id)).last_state == pb.ROLLOUT_STATE_ROLLED_BACK
        done = await rollouts.get(failing.id)
        assert "rejected the bundle (budget 1)" in done.reason
        assert done.steps[1].state == pb.STEP_STATE_PENDING  # never written
        await driver_passes(plane.app, 2)  # nor by a later pass
        assert set(await desired(plane, ids[1:])) == {v2}
        assert {by_id[i].digest for i in ids[1:]} == {v2}


async def test_offline_nodes_count_against_max_unavailable(plane: Harness) -> None:
    async with running(fleet(plane.address, plane.token, 4)) as sim:
        rollouts = Rollouts(plane.channel)
        await everyone_on(rollouts, await plane.upload(archive("v1")))
        await sim.stop_node(1)
        gone = sim.nodes[1].node_id
        for _ in range(100):
            node = (await plane.nodes.GetNode(node_pb2.GetNodeRequest(node_id=gone))).node
            if node.status == node_pb2.NODE_STATUS_OFFLINE:
                break
            await asyncio.sleep(0.1)
        assert node.status == node_pb2.NODE_STATUS_OFFLINE

        v2 = await plane.upload(archive("v2"))
        strict = await rollouts.create(
            v2,
            selector="*",
            rolling=pb.RollingParams(batch_size=4),
            max_unavailable=0,
            progress_deadline=seconds(3),
        )
        assert (await rollouts.watch(strict.id)).last_state == pb.ROLLOUT_STATE_ROLLED_BACK
        assert gone in (await rollouts.get(strict.id)).reason

        tolerant = await rollouts.create(
            v2, selector="*", rolling=pb.RollingParams(batch_size=4), max_unavailable=1
        )
        assert (await rollouts.watch(tolerant.id)).last_state == pb.ROLLOUT_STATE_SUCCEEDED
        nodes = {n.node_id: n for n in await rollouts.nodes(tolerant.id)}
        assert nodes[gone].state == pb.NODE_STATE_OFFLINE and "unavailable" in nodes[gone].error
        reason = (await rollouts.get(tolerant.id)).reason
        assert f"1 node(s) not updated, unavailable while their step ran: {gone}" in reason
        # Back online, the node converges on what its step wrote for it.
        sim.start_node(1)
        await settle(sim, v2)


async def test_pause_holds_and_resume_continues(make_harness: HarnessFactory) -> None:
    """Paused, the rollout stays put through driver passes that would have finished its
    step — the node beat since it applied the bundle, and the server's clock is moved far
    past the bake (heartbeats stay fresh across the jump) — and resumed, it finishes."""
    clock = TestClock()
    plane = await make_harness(clock=clock, **STEADY)
    async with running(fleet(plane.address, plane.token, 3)) as sim:
        rollouts = Rollouts(plane.channel)
        v1 = await plane.upload(archive("v1"))
        created = await rollouts.create(v1, rolling=pb.RollingParams(batch_size=1), bake_time=seconds(60))
        await rollouts.watch(created.id, until=[pb.ROLLOUT_STATE_RUNNING])
        paused = (
            await rollouts.stub.PauseRollout(
                pb.PauseRolloutRequest(project="default", rollout_id=created.id, reason="checking graphs")
            )
        ).rollout
        assert paused.state == pb.ROLLOUT_STATE_PAUSED and paused.reason == "checking graphs"

        async def beat_on_v1() -> None:
            # Step 0's node (written as the rollout started) runs v1 and has beaten
            # since: all its gate would ask for.
            written = [n for n in await rollouts.nodes(created.id) if n.assigned_revision]
            for node in written:
                beats = await plane.nodes.ListHeartbeats(node_pb2.ListHeartbeatsRequest(node_id=node.node_id))
                assert any(h.applied_digest == v1 for h in beats.heartbeats), beats

        await eventually(beat_on_v1, what="a heartbeat of step 0's node on v1")
        clock.advance(timedelta(minutes=2))  # the bake over, the step deadline not
        await driver_passes(plane.app, 5)
        still = await rollouts.get(created.id)
        assert still.state == pb.ROLLOUT_STATE_PAUSED
        assert [s.state for s in still.steps[1:]] == [pb.STEP_STATE_PENDING] * 2
        assert sum(1 for n in sim.nodes if n.digest == v1) <= 1
        resumed = await rollouts.stub.ResumeRollout(
            pb.ResumeRolloutRequest(project="default", rollout_id=created.id)
        )
        assert resumed.rollout.state == pb.ROLLOUT_STATE_RUNNING
        seen = await watch_past_bakes(rollouts, created.id, clock, timedelta(seconds=60))
        assert seen.last_state == pb.ROLLOUT_STATE_SUCCEEDED
        assert {n.digest for n in sim.nodes} == {v1}


async def test_manual_rollback_restores_what_each_node_had(plane: Harness) -> None:
    async with running(fleet(plane.address, plane.token, 4)) as sim:
        rollouts = Rollouts(plane.channel)
        # The baseline comes from a selector assignment: the nodes' own keys hold nothing,
        # so rolling back hands them back to the selector (a tombstone on their key).
        v1 = await plane.upload(archive("v1"))
        await plane.assign(v1, selector="env=prod")
        await settle(sim, v1)
        v2 = await plane.upload(archive("v2"))
        created = await rollouts.create(v2, rolling=pb.RollingParams(batch_size=2), bake_time=seconds(60))
        for _ in range(100):
            rollout = await rollouts.get(created.id)
            if rollout.steps[0].state == pb.STEP_STATE_BAKING:
                break
            await asyncio.sleep(0.1)
        await settle_some(sim, v2, 2)
        back = await rollouts.stub.RollbackRollout(
            pb.RollbackRolloutRequest(project="default", rollout_id=created.id, reason="bad deploy")
        )
        assert back.rollout.state == pb.ROLLOUT_STATE_ROLLED_BACK and back.rollout.reason == "bad deploy"
        await settle(sim, v1)
        nodes = await rollouts.nodes(created.id)
        assert sorted(n.state for n in nodes) == [pb.NODE_STATE_PENDING] * 2 + [pb.NODE_STATE_ROLLED_BACK] * 2
        events = await rollouts.events(created.id)
        assert any(
            e.kind == "write" and "restore written: 2 of 2 node(s) put back" in e.message for e in events
        )
        assert (await rollouts.get(created.id)).steps[1].revision == 0


async def test_rollback_restores_the_selector_assignment_made_after_an_earlier_rollout(
    plane: Harness,
) -> None:
    """Rollout A leaves the nodes' own keys on v0; a selector assignment then moves the
    fleet to v1 (a higher revision than those keys). Rolling back rollout B (v2) must
    bring the nodes to v1 — their effective desired state before B — not to v0, the value
    their own keys still held."""
    async with running(fleet(plane.address, plane.token, 3)) as sim:
        rollouts = Rollouts(plane.channel)
        v0 = await everyone_on(rollouts, await plane.upload(archive("v0")))
        v1 = await plane.upload(archive("v1"))
        await plane.assign(v1, selector="env=prod")
        await settle(sim, v1)
        v2 = await plane.upload(archive("v2"))
        created = await rollouts.create(v2, rolling=pb.RollingParams(batch_size=2), bake_time=seconds(60))
        await settle_some(sim, v2, 2)
        nodes = {n.node_id: n for n in await rollouts.nodes(created.id)}
        written = [n for n in nodes.values() if n.assigned_revision]
        assert len(written) == 2 and {n.previous_digest for n in written} == {v1}
        back = await rollouts.stub.RollbackRollout(
            pb.RollbackRolloutRequest(project="default", rollout_id=created.id, reason="bad deploy")
        )
        assert back.rollout.state == pb.ROLLOUT_STATE_ROLLED_BACK
        await settle(sim, v1)
        for node in sim.nodes:
            told = [o.digest for o in node.observed]
            after = told[told.index(v2) :] if v2 in told else []
            assert told[-1] == v1 and v0 not in after, (node.node_id, told)


async def test_cancel_keeps_nodes_on_the_bundle_and_puts_back_the_others(plane: Harness) -> None:
    """Cancelling a running rollout: a node that applied the bundle keeps it; a node it
    wrote that has not applied it (offline here) goes back to what it had, and never
    installs the bundle when it returns. Cancelling a FAILED rollout points its NACKing
    nodes back at their previous bundle."""
    async with running(fleet(plane.address, plane.token, 3)) as sim:
        rollouts = Rollouts(plane.channel)
        v1 = await everyone_on(rollouts, await plane.upload(archive("v1")))
        await sim.stop_node(1)
        away = sim.nodes[1]
        v2 = await plane.upload(archive("v2"))
        created = await rollouts.create(
            v2, strategy=pb.STRATEGY_ALL_AT_ONCE, bake_time=seconds(60), max_unavailable=1
        )
        await settle_some(sim, v2, 2)
        await recorded_active(rollouts, created.id, 2)  # what "runs the bundle" means to cancel
        cancelled = await rollouts.stub.CancelRollout(
            pb.CancelRolloutRequest(project="default", rollout_id=created.id, reason="wrong bundle")
        )
        assert cancelled.rollout.state == pb.ROLLOUT_STATE_CANCELLED
        nodes = {n.node_id: n for n in await rollouts.nodes(created.id)}
        assert nodes[away.node_id].state == pb.NODE_STATE_ROLLED_BACK
        assert {nodes[n.node_id].state for n in sim.nodes if n is not away} == {pb.NODE_STATE_ACTIVE}
        events = await rollouts.events(created.id)
        assert any("2 node(s) keep the bundle they run, 1 put back" in e.message for e in events)
        assert any(e.kind == "write" and "restore written: 1 of 1" in e.message for e in events)
        sim.start_node(1)
        for _ in range(150):
            if away.running and away.observed and away.digest == v1:
                break
            await asyncio.sleep(0.1)
        assert away.digest == v1 and v2 not in {o.digest for o in away.observed}, away.observed
        assert await desired(plane, [n.node_id for n in sim.nodes]) == [v2, v1, v2]
        assert [n.digest for n in sim.nodes] == [v2, v1, v2]

        # A FAILED rollout (auto-rollback off): cancelling it takes the NACKing node off v3.
        v3 = await plane.upload(archive("v3"))
        sim.nodes[0].rejects.add(v3)
        failing = await rollouts.create(
            v3, selector="*", strategy=pb.STRATEGY_ALL_AT_ONCE, auto_rollback=False, bake_time=seconds(0)
        )
        await rollouts.wait_state(failing.id, pb.ROLLOUT_STATE_FAILED)
        await rollouts.stub.CancelRollout(pb.CancelRolloutRequest(project="default", rollout_id=failing.id))
        await settle_some(sim, v3, 2)
        nacking = sim.nodes[0]
        for _ in range(100):
            if nacking.observed[-1].digest == v2:
                break
            await asyncio.sleep(0.1)
        assert nacking.observed[-1].digest == v2 and nacking.digest == v2
        assert {n.digest for n in sim.nodes[1:]} == {v3}


async def desired(plane: Harness, node_ids: list[str]) -> list[str]:
    """What the server wants each node to run: a write the nodes have yet to hear of
    shows here at once (where waiting on the nodes would need a sleep)."""
    return [
        (await plane.nodes.GetNode(node_pb2.GetNodeRequest(node_id=n))).node.desired_digest for n in node_ids
    ]


async def recorded_active(rollouts: Rollouts, rollout_id: str, count: int) -> None:
    """The server has `count` of the rollout's nodes ACTIVE: their reports recorded, not
    only applied by the agents."""

    async def active() -> None:
        states = [n.state for n in await rollouts.nodes(rollout_id)]
        assert states.count(pb.NODE_STATE_ACTIVE) >= count, states

    await eventually(active, what=f"{count} node(s) recorded ACTIVE")


async def settle_some(sim: FleetSimulator, digest: str, count: int) -> None:
    for _ in range(150):
        if sum(1 for n in sim.nodes if n.digest == digest) >= count:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"fewer than {count} node(s) on {digest}")


async def test_rollback_never_restores_a_revoked_bundle(plane: Harness) -> None:
    async with running(fleet(plane.address, plane.token, 2)) as sim:
        rollouts = Rollouts(plane.channel)
        v1 = await plane.upload(archive("v1"))
        created = await rollouts.create(v1, selector="*", strategy=pb.STRATEGY_ALL_AT_ONCE)
        await rollouts.watch(created.id)
        v2 = await plane.upload(archive("v2"))
        upgrade = await rollouts.create(v2, strategy=pb.STRATEGY_ALL_AT_ONCE, bake_time=seconds(60))
        await settle(sim, v2)
        await plane.bundles.RevokeBundle(
            bundle_pb2.RevokeBundleRequest(project="default", digest=v1, reason="leaked")
        )
        back = await rollouts.stub.RollbackRollout(
            pb.RollbackRolloutRequest(project="default", rollout_id=upgrade.id, reason="try to go back")
        )
        assert back.rollout.state == pb.ROLLOUT_STATE_ROLLED_BACK
        nodes = await rollouts.nodes(upgrade.id)
        assert all("not restored" in n.error and "revoked" in n.error for n in nodes), nodes
        await driver_passes(plane.app, 2)  # nor by a later pass
        assert set(await desired(plane, [n.node_id for n in sim.nodes])) == {v2}
        assert {n.digest for n in sim.nodes} == {v2}


async def test_revoking_the_bundle_mid_rollout_rolls_it_back_with_the_reason(plane: Harness) -> None:
    async with running(fleet(plane.address, plane.token, 4)) as sim:
        rollouts = Rollouts(plane.channel)
        v1 = await everyone_on(rollouts, await plane.upload(archive("v1")))
        v2 = await plane.upload(archive("v2"))
        created = await rollouts.create(v2, rolling=pb.RollingParams(batch_size=2), bake_time=seconds(60))
        await settle_some(sim, v2, 2)
        await plane.bundles.RevokeBundle(
            bundle_pb2.RevokeBundleRequest(project="default", digest=v2, reason="leaked secret in config")
        )
        seen = await rollouts.watch(created.id)
        assert seen.last_state == pb.ROLLOUT_STATE_ROLLED_BACK
        done = await rollouts.get(created.id)
        assert done.reason.startswith("automatic rollback:") and "revoked" in done.reason, done.reason
        assert "leaked secret in config" in done.reason, done.reason
        assert done.steps[0].state == pb.STEP_STATE_FAILED and done.steps[1].revision == 0
        await settle(sim, v1)
        assert not [n for n in sim.nodes if n.observed[-1].digest == v2]
