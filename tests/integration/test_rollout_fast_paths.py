"""The operator's fast paths: a pause step that waits for an operator, promote to the end
(still honouring pins), skip the current step, retry a rolled-back rollout as a new one
linked to it — each audited. Real agents (simulated fleet) over real gRPC, on SQLite and
PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest

from controlplane.api.audit.v1 import audit_pb2
from tests.conftest import HarnessFactory
from tests.support.eventually import eventually
from tests.support.harness import Harness
from tests.support.refusals import expect
from tests.support.rollout_fleet import FAST, Rollouts, archive, fleet, pb, running, seconds


@pytest.fixture
async def plane(make_harness: HarnessFactory) -> Harness:
    return await make_harness(**FAST)


async def until(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    async def check() -> None:
        assert predicate(), what

    await eventually(check, timeout=timeout, what=what)


async def audited(plane: Harness, action: str) -> list[audit_pb2.AuditEvent]:
    listed = await plane.audit.ListAuditEvents(audit_pb2.ListAuditEventsRequest(page_size=1000))
    return [e for e in listed.events if e.action == action]


async def test_a_pause_step_waits_for_an_operator(plane: Harness) -> None:
    async with running(fleet(plane.address, plane.token, 3)) as sim:
        rollouts = Rollouts(plane.channel)
        v1 = await plane.upload(archive("v1"))
        await expect(
            grpc.StatusCode.INVALID_ARGUMENT,
            rollouts.create(v1, rolling=pb.RollingParams(batch_size=1), pause_after_steps=[2]),
            "pause_after_steps",
        )
        created = await rollouts.create(v1, rolling=pb.RollingParams(batch_size=1), pause_after_steps=[0])
        paused = await rollouts.wait_state(created.id, pb.ROLLOUT_STATE_PAUSED)
        assert paused.reason.startswith("pause step: after step 0"), paused.reason
        view = await rollouts.get(created.id)
        assert [s.state for s in view.steps] == [
            pb.STEP_STATE_DONE,
            pb.STEP_STATE_PENDING,
            pb.STEP_STATE_PENDING,
        ]
        assert sum(1 for n in sim.nodes if n.digest == v1) == 1
        await rollouts.stub.ResumeRollout(pb.ResumeRolloutRequest(project="default", rollout_id=created.id))
        assert (await rollouts.watch(created.id)).last_state == pb.ROLLOUT_STATE_SUCCEEDED
        assert {n.digest for n in sim.nodes} == {v1}


async def test_promote_takes_the_rollout_to_the_end_and_keeps_pins(plane: Harness) -> None:
    async with running(fleet(plane.address, plane.token, 4)) as sim:
        rollouts = Rollouts(plane.channel)
        v1 = await plane.upload(archive("v1"))
        created = await rollouts.create(
            v1, rolling=pb.RollingParams(batch_size=1), bake_time=seconds(300), pause_after_steps=[1]
        )
        nodes = sorted(n.node_id for n in sim.nodes)
        await until(lambda: sim.by_node_id(nodes[0]).digest == v1, "step 0's node on v1")
        # A node of a later step pinned meanwhile: promotion leaves it alone.
        v2 = await plane.upload(archive("v2"))
        await rollouts.stub.PinNode(
            pb.PinNodeRequest(project="default", node_id=nodes[3], digest=v2, reason="hold on v2")
        )
        reply = await rollouts.stub.PromoteRollout(
            pb.PromoteRolloutRequest(project="default", rollout_id=created.id, reason="looks good")
        )
        assert reply.rollout.state in (pb.ROLLOUT_STATE_RUNNING, pb.ROLLOUT_STATE_SUCCEEDED)
        seen = await rollouts.watch(created.id)
        assert seen.last_state == pb.ROLLOUT_STATE_SUCCEEDED
        assert [sim.by_node_id(n).digest for n in nodes] == [v1, v1, v1, v2]
        events = [e.message for e in await rollouts.events(created.id)]
        assert any("promoted to the end by" in m and "looks good" in m for m in events), events
        assert not any(m.startswith("running -> paused") for m in events), events
        skipped = [n for n in await rollouts.nodes(created.id) if n.state == pb.NODE_STATE_SKIPPED]
        assert [n.node_id for n in skipped] == [nodes[3]]
        assert len(await audited(plane, "rollout.promote")) == 1
        # An ended rollout cannot be promoted.
        await expect(
            grpc.StatusCode.FAILED_PRECONDITION,
            rollouts.stub.PromoteRollout(pb.PromoteRolloutRequest(project="default", rollout_id=created.id)),
            "succeeded",
        )


async def test_skip_step_ends_the_current_step_now(plane: Harness) -> None:
    async with running(fleet(plane.address, plane.token, 2)) as sim:
        rollouts = Rollouts(plane.channel)
        v1 = await plane.upload(archive("v1"))
        created = await rollouts.create(v1, rolling=pb.RollingParams(batch_size=1), bake_time=seconds(300))
        await until(lambda: sum(1 for n in sim.nodes if n.digest == v1) == 1, "step 0 applied")
        request = pb.SkipRolloutStepRequest(project="default", rollout_id=created.id, reason="known good")
        await rollouts.stub.SkipRolloutStep(request)
        await until(lambda: all(n.digest == v1 for n in sim.nodes), "step 1 applied after the skip")
        view = await rollouts.get(created.id)
        assert view.steps[0].state == pb.STEP_STATE_DONE and view.steps[1].state != pb.STEP_STATE_PENDING
        await rollouts.stub.SkipRolloutStep(request)
        assert (await rollouts.watch(created.id)).last_state == pb.ROLLOUT_STATE_SUCCEEDED
        events = [e.message for e in await rollouts.events(created.id)]
        assert sum(1 for m in events if "skipped by" in m and "known good" in m) == 2, events
        assert len(await audited(plane, "rollout.skip_step")) == 2
        await expect(grpc.StatusCode.FAILED_PRECONDITION, rollouts.stub.SkipRolloutStep(request), "no step")


async def test_retry_makes_a_new_rollout_linked_to_the_old(plane: Harness) -> None:
    async with running(fleet(plane.address, plane.token, 2)) as sim:
        rollouts = Rollouts(plane.channel)
        v1 = await plane.upload(archive("v1"))
        sim.nodes[0].rejects.add(v1)
        failed = await rollouts.create(v1, strategy=pb.STRATEGY_ALL_AT_ONCE)
        assert (await rollouts.watch(failed.id)).last_state == pb.ROLLOUT_STATE_ROLLED_BACK
        sim.nodes[0].rejects.clear()
        reply = await rollouts.stub.RetryRollout(
            pb.RetryRolloutRequest(project="default", rollout_id=failed.id)
        )
        retried = reply.rollout
        assert retried.id != failed.id and retried.retry_of == failed.id
        assert retried.spec.strategy == pb.STRATEGY_ALL_AT_ONCE and retried.bundle_digest == v1
        assert (await rollouts.watch(retried.id)).last_state == pb.ROLLOUT_STATE_SUCCEEDED
        assert {n.digest for n in sim.nodes} == {v1}
        first = (await rollouts.events(retried.id))[0].message
        assert f"retry of {failed.id}" in first, first
        # The old one keeps its own history; only ended-and-undone rollouts are retried.
        assert (await rollouts.get(failed.id)).state == pb.ROLLOUT_STATE_ROLLED_BACK
        await expect(
            grpc.StatusCode.FAILED_PRECONDITION,
            rollouts.stub.RetryRollout(pb.RetryRolloutRequest(project="default", rollout_id=retried.id)),
            "rolled-back or cancelled",
        )
        await expect(
            grpc.StatusCode.NOT_FOUND,
            rollouts.stub.RetryRollout(pb.RetryRolloutRequest(project="default", rollout_id="r-nope")),
            "rollout_id",
        )
