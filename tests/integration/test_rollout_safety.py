"""The safety checks on every path that starts or advances a rollout: one active rollout
per node, freeze windows (create, start, advance), approvals by distinct operators who
did not create it, scheduled starts (and cancelling them), pinned nodes, bundles that
may not be assigned, and bad input that leaves nothing behind. Real agents (simulated
fleet) over real gRPC, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from controlplane.api.audit.v1 import audit_pb2
from controlplane.api.bundle.v1 import bundle_pb2
from controlplane.api.identity.v1 import identity_pb2
from tests.conftest import HarnessFactory
from tests.support.clock import TestClock
from tests.support.harness import Harness
from tests.support.refusals import expect
from tests.support.rollout_fleet import (
    FAST,
    STEADY,
    Rollouts,
    archive,
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


def at(delta: timedelta) -> Timestamp:
    return stamp(datetime.now(UTC) + delta)


def stamp(when: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(when)
    return ts


async def freeze(
    rollouts: Rollouts, name: str, starts: Timestamp, ends: Timestamp, reason: str
) -> pb.FreezeWindow:
    request = pb.CreateFreezeWindowRequest(
        project="default", name=name, starts_at=starts, ends_at=ends, reason=reason
    )
    return (await rollouts.stub.CreateFreezeWindow(request)).window


def key(secret: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {secret}"),)


async def test_a_node_belongs_to_one_active_rollout(plane: Harness) -> None:
    async with running(fleet(plane.address, plane.token, 4)):
        v1, v2 = await plane.upload(archive("v1")), await plane.upload(archive("v2"))
        rollouts = Rollouts(plane.channel)
        first = await rollouts.create(v1, approvals_required=1)
        details = await expect(
            grpc.StatusCode.FAILED_PRECONDITION, rollouts.create(v2, selector="*"), first.id
        )
        assert "selector" in details
        listed = await rollouts.stub.ListRollouts(pb.ListRolloutsRequest(project="default"))
        assert [r.id for r in listed.rollouts] == [first.id]
        await rollouts.stub.CancelRollout(pb.CancelRolloutRequest(project="default", rollout_id=first.id))
        # Its nodes are free again.
        second = await rollouts.create(v2, selector="*")
        assert (await rollouts.watch(second.id)).last_state == pb.ROLLOUT_STATE_SUCCEEDED


async def test_assign_bundle_cannot_move_nodes_an_active_rollout_holds(plane: Harness) -> None:
    async with running(fleet(plane.address, plane.token, 3)) as sim:
        outsider = await plane.register("outsider", {"env": "dev"})
        v1, v2 = await plane.upload(archive("v1")), await plane.upload(archive("v2"))
        rollouts = Rollouts(plane.channel)
        created = await rollouts.create(v1, rolling=pb.RollingParams(batch_size=1), bake_time=seconds(60))
        held = sim.nodes[0].node_id
        refused = grpc.StatusCode.FAILED_PRECONDITION
        # Neither a selector reaching its nodes nor its nodes by id, pinned or not.
        details = await expect(refused, plane.assign(v2, selector="env=prod"), created.id)
        assert "target" in details
        await expect(refused, plane.assign(v2, selector="*"), created.id)
        await expect(refused, plane.assign(v2, nodes=[outsider.node_id, held]), created.id)
        await expect(refused, plane.assign(v2, nodes=[held], pin=True), created.id)
        unassign = bundle_pb2.UnassignBundleRequest(
            project="default", target=bundle_pb2.Target(selector="env=prod")
        )
        await expect(refused, plane.bundles.UnassignBundle(unassign), created.id)
        # Nodes it does not hold are free.
        assert await plane.assign(v2, selector="env=dev")
        assert await plane.assign(v2, nodes=[outsider.node_id])
        nodes = await rollouts.nodes(created.id)
        assert all(n.previous_digest == "" for n in nodes if n.assigned_revision)
        await rollouts.stub.CancelRollout(pb.CancelRolloutRequest(project="default", rollout_id=created.id))
        assert await plane.assign(v2, selector="env=prod")


async def test_assign_bundle_respects_freeze_windows_unless_overridden(plane: Harness) -> None:
    node = await plane.register("edge", {"env": "prod"})
    v1 = await plane.upload(archive("v1"))
    rollouts = Rollouts(plane.channel)
    await freeze(rollouts, "peak", at(-timedelta(minutes=1)), at(timedelta(hours=1)), "sale")
    frozen = grpc.StatusCode.FAILED_PRECONDITION
    details = await expect(frozen, plane.assign(v1, selector="env=prod"), "'peak'")
    assert "freeze_override_reason" in details
    await expect(frozen, plane.assign(v1, nodes=[node.node_id]), "'peak'")
    await expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        plane.assign(v1, selector="env=prod", freeze_override_reason="x" * 1001),
        "freeze_override_reason",
    )
    revision = await plane.assign(v1, selector="env=prod", freeze_override_reason="hotfix for CVE")
    assert revision > 0
    target = bundle_pb2.Target(selector="env=prod")
    await expect(
        frozen,
        plane.bundles.UnassignBundle(bundle_pb2.UnassignBundleRequest(project="default", target=target)),
    )
    await plane.bundles.UnassignBundle(
        bundle_pb2.UnassignBundleRequest(project="default", target=target, freeze_override_reason="revert")
    )
    entries = await audit_entries(plane, "desired.assign")
    assert entries and entries[-1]["after"]["freeze_override_reason"] == "hotfix for CVE"


async def audit_entries(plane: Harness, action: str) -> list[dict[str, Any]]:
    reply = await plane.audit.ListAuditEvents(
        audit_pb2.ListAuditEventsRequest(project="default", filter=audit_pb2.AuditFilter(action=action))
    )
    return [json_format.MessageToDict(e) for e in reply.events]


async def test_freeze_windows_block_create_and_hold_start_and_advance(make_harness: HarnessFactory) -> None:
    """Times are the server's clock, moved by the test to the scheduled start
    (heartbeats stay fresh across the jump)."""
    clock = TestClock()
    plane = await make_harness(clock=clock, **STEADY)

    def at(delta: timedelta) -> Timestamp:
        return stamp(clock() + delta)

    async with running(fleet(plane.address, plane.token, 2)) as sim:
        v1 = await plane.upload(archive("v1"))
        rollouts = Rollouts(plane.channel)
        window = await freeze(rollouts, "sale", at(-timedelta(minutes=1)), at(timedelta(hours=1)), "peak")
        # Create: refused during the window, naming it; allowed with a reason.
        await expect(grpc.StatusCode.FAILED_PRECONDITION, rollouts.create(v1), "'sale'")
        forced = await rollouts.create(v1, strategy=pb.STRATEGY_ALL_AT_ONCE, freeze_override_reason="CVE fix")
        assert (await rollouts.watch(forced.id)).last_state == pb.ROLLOUT_STATE_SUCCEEDED
        await rollouts.stub.DeleteFreezeWindow(pb.DeleteFreezeWindowRequest(project="default", id=window.id))

        # Start: a scheduled rollout whose time comes inside a window waits for it to end.
        v2 = await plane.upload(archive("v2"))
        scheduled = await rollouts.create(
            v2, scheduled_at=at(timedelta(hours=1)), rolling=pb.RollingParams(batch_size=1)
        )
        window = await freeze(rollouts, "late", at(timedelta(minutes=30)), at(timedelta(hours=2)), "x")
        clock.advance(timedelta(hours=1))
        held = await rollouts.wait_state(scheduled.id, pb.ROLLOUT_STATE_PENDING)
        for _ in range(50):
            held = await rollouts.get(scheduled.id)
            if held.reason.startswith("held:"):
                break
            await asyncio.sleep(0.1)
        assert "freeze window 'late'" in held.reason and not held.steps[0].revision
        assert {n.digest for n in sim.nodes} == {v1}
        await rollouts.stub.DeleteFreezeWindow(pb.DeleteFreezeWindowRequest(project="default", id=window.id))

        # Advance: once step 0 bakes, a new window holds step 1 until it is gone.
        await rollouts.wait_state(scheduled.id, pb.ROLLOUT_STATE_RUNNING)
        window = await freeze(rollouts, "again", at(-timedelta(seconds=1)), at(timedelta(hours=1)), "y")
        for _ in range(100):
            mid = await rollouts.get(scheduled.id)
            if mid.reason.startswith("held:"):
                break
            await asyncio.sleep(0.1)
        assert mid.steps[0].state == pb.STEP_STATE_DONE and mid.steps[1].state == pb.STEP_STATE_PENDING
        assert "'again'" in mid.reason
        await rollouts.stub.DeleteFreezeWindow(pb.DeleteFreezeWindowRequest(project="default", id=window.id))
        assert (await rollouts.watch(scheduled.id)).last_state == pb.ROLLOUT_STATE_SUCCEEDED
        assert {n.digest for n in sim.nodes} == {v2}
        holds = [e.message for e in await rollouts.events(scheduled.id) if e.kind == "hold"]
        assert len(holds) == 4, holds  # held, released, held, released: once each, not per tick


async def mint(plane: Harness, by: str, name: str, role: identity_pb2.Role.ValueType, days: int) -> str:
    """A key of project `default` minted by the key `by` (so `created_by` names it)."""
    made = await plane.identity.CreateApiKey(
        identity_pb2.CreateApiKeyRequest(
            name=name,
            grants=[identity_pb2.Grant(project="default", role=role)],
            ttl=Duration(seconds=days * 86400),  # a minted key may not outlive its minter
        ),
        metadata=key(by),
    )
    return str(made.secret)


async def test_approvals_need_distinct_operators_other_than_the_creator(plane: Harness) -> None:
    """Distinct means more than distinct key ids: keys form minting lines (the key that
    minted a key, the key that minted that one, ...). The creator's line may not approve
    — keys it minted, directly or through others, nor the keys that minted it — and two
    approvals from one line count once."""
    operator, admin = identity_pb2.ROLE_OPERATOR, identity_pb2.ROLE_ADMIN
    root = plane.admin_key  # the first-start key: it minted every other key
    mentor = await mint(plane, root, "mentor", admin, 30)
    alice = await mint(plane, mentor, "alice", admin, 20)  # the creator
    intern = await mint(plane, alice, "intern", admin, 10)
    trainee = await mint(plane, intern, "trainee", operator, 5)
    bob = await mint(plane, root, "bob", admin, 30)
    bobs_alias = await mint(plane, bob, "bob again", operator, 20)
    carol = await mint(plane, root, "carol", operator, 30)
    reader = await plane.api_key({"default": identity_pb2.ROLE_READER}, name="dave")
    async with running(fleet(plane.address, plane.token, 2)) as sim:
        v1 = await plane.upload(archive("v1"))
        rollouts = Rollouts(plane.channel)
        stub = rollouts.stub
        created = (
            await stub.CreateRollout(
                pb.CreateRolloutRequest(
                    project="default",
                    bundle_digest=v1,
                    selector="env=prod",
                    strategy=pb.STRATEGY_ALL_AT_ONCE,
                    approvals_required=2,
                    bake_time=seconds(0),
                ),
                metadata=key(alice),
            )
        ).rollout
        assert created.state == pb.ROLLOUT_STATE_PENDING_APPROVAL and created.created_by.startswith(
            "operator:"
        )

        def approve(secret: str) -> Any:
            return stub.ApproveRollout(
                pb.ApproveRolloutRequest(project="default", rollout_id=created.id, comment="lgtm"),
                metadata=key(secret),
            )

        denied = grpc.StatusCode.PERMISSION_DENIED
        await expect(denied, approve(alice), "cannot approve")
        await expect(denied, approve(reader))
        # The creator's line: what it minted, directly or not, and what minted it.
        await expect(
            denied, approve(intern), f"was minted (directly or through other keys) by {created.created_by}"
        )
        await expect(
            denied, approve(trainee), f"was minted (directly or through other keys) by {created.created_by}"
        )
        await expect(denied, approve(mentor), f"minted (directly or through other keys) {created.created_by}")
        await expect(denied, approve(root), f"minted (directly or through other keys) {created.created_by}")
        assert not (await rollouts.get(created.id)).approvals, "a refused approval leaves nothing"
        one = (await approve(bob)).rollout
        assert one.state == pb.ROLLOUT_STATE_PENDING_APPROVAL and len(one.approvals) == 1
        await expect(grpc.StatusCode.ALREADY_EXISTS, approve(bob), "already approved")
        # A key bob minted is bob again: one line, one approval.
        await expect(
            grpc.StatusCode.ALREADY_EXISTS, approve(bobs_alias), "approvals from one line count once"
        )
        assert len((await rollouts.get(created.id)).approvals) == 1
        await driver_passes(plane.app, 3)
        waiting = await rollouts.get(created.id)
        assert waiting.state == pb.ROLLOUT_STATE_PENDING_APPROVAL and not waiting.steps[0].revision
        assert {n.digest for n in sim.nodes} == {""}, "nothing may start before approval"
        two = (await approve(carol)).rollout
        assert {a.actor for a in two.approvals} == {
            a.actor for a in two.approvals if a.actor != created.created_by
        }
        assert len({a.actor for a in two.approvals}) == 2
        assert (await rollouts.watch(created.id)).last_state == pb.ROLLOUT_STATE_SUCCEEDED

        rejected = (
            await stub.CreateRollout(
                pb.CreateRolloutRequest(
                    project="default",
                    bundle_digest=v1,
                    selector="*",
                    strategy=pb.STRATEGY_ALL_AT_ONCE,
                    approvals_required=1,
                ),
                metadata=key(alice),
            )
        ).rollout
        await expect(
            grpc.StatusCode.INVALID_ARGUMENT,
            stub.RejectRollout(
                pb.RejectRolloutRequest(project="default", rollout_id=rejected.id), metadata=key(bob)
            ),
            "reason",
        )
        done = await stub.RejectRollout(
            pb.RejectRolloutRequest(project="default", rollout_id=rejected.id, reason="not today"),
            metadata=key(bob),
        )
        assert done.rollout.state == pb.ROLLOUT_STATE_REJECTED and "not today" in done.rollout.reason


async def test_scheduled_rollouts_start_on_time_and_can_be_cancelled_while_waiting(
    make_harness: HarnessFactory,
) -> None:
    """Time is the server's clock, moved by the test: a rollout scheduled an hour ahead
    starts on the first driver pass once the clock reaches its time, not before, and one
    cancelled while it waited never starts. Heartbeats stay fresh across the jump (offline
    and gate staleness far longer than it), so only the schedule is under test."""
    clock = TestClock()
    plane = await make_harness(clock=clock, **STEADY)
    async with running(fleet(plane.address, plane.token, 2)) as sim:
        v0, v1 = await plane.upload(archive("v0")), await plane.upload(archive("v1"))
        rollouts = Rollouts(plane.channel)
        waiting = await rollouts.create(
            v0, scheduled_at=stamp(clock() + timedelta(hours=1)), strategy=pb.STRATEGY_ALL_AT_ONCE
        )
        cancelled = await rollouts.stub.CancelRollout(
            pb.CancelRolloutRequest(project="default", rollout_id=waiting.id, reason="wrong bundle")
        )
        assert cancelled.rollout.state == pb.ROLLOUT_STATE_CANCELLED
        when = clock() + timedelta(hours=2)
        scheduled = await rollouts.create(v1, scheduled_at=stamp(when), strategy=pb.STRATEGY_ALL_AT_ONCE)
        assert scheduled.state == pb.ROLLOUT_STATE_PENDING
        clock.advance(timedelta(hours=2) - timedelta(seconds=10))  # ten seconds short of it
        for _ in range(5):  # several driver passes (the tick is 0.1 s): nothing starts
            await asyncio.sleep(FAST["rollout_tick"].total_seconds())
            assert (await rollouts.get(scheduled.id)).state == pb.ROLLOUT_STATE_PENDING
        clock.advance(when - clock())
        seen = await rollouts.watch(scheduled.id)
        assert seen.last_state == pb.ROLLOUT_STATE_SUCCEEDED
        done = await rollouts.get(scheduled.id)
        # At the scheduled time, not merely after it: on the first driver pass at or past
        # it — one tick, plus a pass already running, plus slack for a busy machine.
        started = done.started_at.ToDatetime(tzinfo=UTC)
        assert when <= started <= when + FAST["rollout_tick"] + timedelta(seconds=1), (when, started)
        assert {n.digest for n in sim.nodes} == {v1}
        never = await rollouts.get(waiting.id)
        assert never.state == pb.ROLLOUT_STATE_CANCELLED and not never.HasField("started_at")
        assert not any(step.revision for step in never.steps)


async def test_pinned_nodes_are_skipped_and_reported(make_harness: HarnessFactory) -> None:
    # Bakes are cut short by moving the server's clock (heartbeats stay fresh for a day).
    clock = TestClock()
    plane = await make_harness(clock=clock, **STEADY)
    async with running(fleet(plane.address, plane.token, 4)) as sim:
        v1, v2 = await plane.upload(archive("v1")), await plane.upload(archive("v2"))
        rollouts = Rollouts(plane.channel)
        ids = sorted(n.node_id for n in sim.nodes)
        await rollouts.stub.PinNode(
            pb.PinNodeRequest(project="default", node_id=ids[0], digest=v1, reason="canary host")
        )
        bake = timedelta(seconds=60)
        created = await rollouts.create(
            v2, rolling=pb.RollingParams(batch_size=1), bake_time=seconds(bake.total_seconds())
        )
        assert "1 pinned node(s) skipped" in (await rollouts.events(created.id))[0].message
        # Pinned during the rollout: skipped when its step comes.
        await rollouts.stub.PinNode(
            pb.PinNodeRequest(project="default", node_id=ids[3], digest=v1, reason="hold")
        )
        seen = await watch_past_bakes(rollouts, created.id, clock, bake)
        assert seen.last_state == pb.ROLLOUT_STATE_SUCCEEDED
        states = {n.node_id: n for n in await rollouts.nodes(created.id)}
        assert states[ids[0]].state == pb.NODE_STATE_SKIPPED and "pinned" in states[ids[0]].error
        assert states[ids[3]].state == pb.NODE_STATE_SKIPPED
        by_id = {n.node_id: n for n in sim.nodes}
        assert by_id[ids[0]].digest == by_id[ids[3]].digest == v1
        assert by_id[ids[1]].digest == by_id[ids[2]].digest == v2
        await rollouts.stub.UnpinNode(pb.UnpinNodeRequest(project="default", node_id=ids[0]))
        await expect(
            grpc.StatusCode.FAILED_PRECONDITION,
            rollouts.stub.UnpinNode(pb.UnpinNodeRequest(project="default", node_id=ids[0])),
            "not pinned",
        )


async def test_revoked_and_invalid_bundles_cannot_be_rolled_out(plane: Harness) -> None:
    async with running(fleet(plane.address, plane.token, 2)):
        v1 = await plane.upload(archive("v1"))
        rollouts = Rollouts(plane.channel)
        await plane.bundles.RevokeBundle(
            bundle_pb2.RevokeBundleRequest(project="default", digest=v1, reason="leaked key")
        )
        await expect(grpc.StatusCode.FAILED_PRECONDITION, rollouts.create(v1), "revoked")
        await expect(
            grpc.StatusCode.FAILED_PRECONDITION,
            rollouts.stub.PinNode(
                pb.PinNodeRequest(
                    project="default", node_id=(await rollouts_any_node(plane)), digest=v1, reason="x"
                )
            ),
            "revoked",
        )
        from tests.support.archives import bundle

        broken = await plane.upload(bundle({"upstreams.json": b'{"backends": [1, 2'}))
        await expect(grpc.StatusCode.FAILED_PRECONDITION, rollouts.create(broken), "failed validation")


async def rollouts_any_node(plane: Harness) -> str:
    from controlplane.api.node.v1 import node_pb2

    reply = await plane.nodes.ListNodes(node_pb2.ListNodesRequest(project="default"))
    return str(reply.nodes[0].id)


async def test_bad_input_names_the_field_and_writes_nothing(plane: Harness) -> None:
    v1 = await plane.upload(archive("v1"))
    rollouts = Rollouts(plane.channel)
    stub, bad = rollouts.stub, grpc.StatusCode.INVALID_ARGUMENT

    def create(**fields: Any) -> Any:
        base: dict[str, Any] = {"project": "default", "bundle_digest": v1, "selector": "env=prod"}
        return stub.CreateRollout(pb.CreateRolloutRequest(**{**base, **fields}))

    await expect(bad, create(), "strategy")
    await expect(bad, create(strategy=pb.STRATEGY_ROLLING), "rolling")
    await expect(
        bad,
        create(strategy=pb.STRATEGY_ROLLING, rolling=pb.RollingParams(batch_percent=150)),
        "rolling.batch_percent",
    )
    await expect(bad, create(strategy=pb.STRATEGY_ROLLING, canary=pb.CanaryParams()), "canary")
    await expect(
        bad,
        create(strategy=pb.STRATEGY_CANARY, canary=pb.CanaryParams(steps_percent=[50, 20, 100])),
        "canary.steps_percent",
    )
    await expect(
        bad, create(strategy=pb.STRATEGY_CANARY, canary=pb.CanaryParams(steps_percent=[5, 50])), "last step"
    )
    await expect(bad, create(strategy=pb.STRATEGY_ALL_AT_ONCE, selector="env=pr od"), "selector")
    await expect(bad, create(strategy=pb.STRATEGY_ALL_AT_ONCE, bundle_digest="sha256:nope"), "bundle_digest")
    await expect(bad, create(strategy=pb.STRATEGY_ALL_AT_ONCE, bundle_version="v1"), "exactly one")
    await expect(
        bad, create(strategy=pb.STRATEGY_ALL_AT_ONCE, scheduled_at=at(-timedelta(minutes=1))), "scheduled_at"
    )
    await expect(
        bad,
        create(strategy=pb.STRATEGY_ALL_AT_ONCE, bake_time=seconds(60), progress_deadline=seconds(30)),
        "progress_deadline",
    )
    await expect(
        bad,
        create(strategy=pb.STRATEGY_ALL_AT_ONCE, gates=pb.HealthGates(max_error_rate=2.0)),
        "gates.max_error_rate",
    )
    await expect(bad, create(strategy=pb.STRATEGY_ALL_AT_ONCE, approvals_required=99), "approvals_required")
    await expect(
        grpc.StatusCode.NOT_FOUND,
        create(strategy=pb.STRATEGY_ALL_AT_ONCE, bundle_digest="sha256:" + "0" * 64),
        "bundle_digest",
    )
    await expect(
        grpc.StatusCode.FAILED_PRECONDITION, create(strategy=pb.STRATEGY_ALL_AT_ONCE), "matches no node"
    )
    await expect(
        grpc.StatusCode.NOT_FOUND,
        stub.PauseRollout(pb.PauseRolloutRequest(project="default", rollout_id="r-missing")),
        "rollout_id",
    )
    await expect(
        bad,
        stub.CreateFreezeWindow(
            pb.CreateFreezeWindowRequest(
                project="default",
                name="x",
                starts_at=at(timedelta(hours=2)),
                ends_at=at(timedelta(hours=1)),
                reason="r",
            )
        ),
        "ends_at",
    )
    huge = Duration(seconds=10**18)
    await expect(bad, create(strategy=pb.STRATEGY_ALL_AT_ONCE, bake_time=huge), "bake_time")
    await expect(
        bad,
        create(strategy=pb.STRATEGY_ALL_AT_ONCE, scheduled_at=Timestamp(seconds=-(2**62))),
        "scheduled_at",
    )
    await expect(
        bad,
        stub.CreateFreezeWindow(
            pb.CreateFreezeWindowRequest(
                project="default",
                name="x",
                starts_at=Timestamp(),
                ends_at=Timestamp(seconds=-(2**63)),
                reason="r",
            )
        ),
        "ends_at",
    )
    listed = await stub.ListRollouts(pb.ListRolloutsRequest(project="default"))
    assert list(listed.rollouts) == []
    windows = await stub.ListFreezeWindows(pb.ListFreezeWindowsRequest(project="default", include_past=True))
    assert list(windows.windows) == []
