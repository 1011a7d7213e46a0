"""Webhook gates: a rollout calls the operator's receiver (a real HTTP server the test
starts) before it starts, before each step is promoted and after each step, holding the
phase until the receiver answers 2xx; a gate that keeps failing pauses the rollout (or
rolls it back, if the gate says so); after the rollout, the receiver hears how it ended
through the notification outbox. Real agents (simulated fleet), SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import grpc
import pytest

from controlplane.api.notification.v1 import notification_pb2 as npb
from controlplane.api.notification.v1 import notification_pb2_grpc
from controlplane.domain.rollouts.webhooks import BACKOFF_BASE
from tests.conftest import HarnessFactory
from tests.support.clock import TestClock
from tests.support.eventually import eventually
from tests.support.harness import Harness
from tests.support.receivers import Receiver
from tests.support.refusals import expect
from tests.support.rollout_fleet import STEADY, Rollouts, archive, fleet, pb, running, seconds

SECRET = "gate-secret"


@pytest.fixture
def clock() -> TestClock:
    return TestClock()


@pytest.fixture
async def plane(make_harness: HarnessFactory, clock: TestClock) -> Harness:
    # A gate's retries are spaced on the server's clock: the tests move it past the
    # backoff instead of waiting it out (heartbeats stay fresh across the jump).
    return await make_harness(
        clock=clock, **STEADY, outbound_allow=("127.0.0.0/8",), notify_timeout=timedelta(seconds=2)
    )


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = await Receiver().start()
    yield r
    await r.stop()


async def webhook_channel(plane: Harness, url: str) -> str:
    stub = notification_pb2_grpc.NotificationServiceStub(plane.channel)
    spec = npb.ChannelSpec(
        name="gates", kind=npb.CHANNEL_KIND_WEBHOOK, url=url, secret=SECRET, events=["drift.opened"]
    )
    spec.group_window.CopyFrom(seconds(0))
    made = await stub.CreateChannel(npb.CreateChannelRequest(project="default", channel=spec))
    return str(made.channel.id)


def gate(phase: int, channel_id: str, **fields: object) -> pb.WebhookGate:
    return pb.WebhookGate(phase=phase, channel_id=channel_id, **fields)  # type: ignore[arg-type]


def calls(receiver: Receiver, phase: str) -> list[dict[str, object]]:
    return [r.json for r in receiver.received if r.headers.get("X-Controlplane-Gate") == phase]


async def past_backoff(rollouts: Rollouts, rollout_id: str, clock: TestClock, failed: str) -> None:
    """Once the rollout recorded the failed call `failed` names, move the server's clock
    past the backoff before the next attempt."""

    async def recorded() -> None:
        messages = [e.message for e in await rollouts.events(rollout_id)]
        assert any(failed in m for m in messages), messages

    await eventually(recorded, what=f"the gate call {failed!r} recorded")
    clock.advance(BACKOFF_BASE)


async def test_a_gate_answering_503_then_200_holds_then_releases_the_step(
    plane: Harness, receiver: Receiver, clock: TestClock
) -> None:
    async with running(fleet(plane.address, plane.token, 2)) as sim:
        channel_id = await webhook_channel(plane, receiver.url)
        receiver.script = [503]
        rollouts = Rollouts(plane.channel)
        v1 = await plane.upload(archive("v1"))
        created = await rollouts.create(
            v1,
            rolling=pb.RollingParams(batch_size=1),
            gates=pb.HealthGates(),
            webhooks=[gate(pb.WEBHOOK_PHASE_PRE_PROMOTION, channel_id)],
        )
        await past_backoff(rollouts, created.id, clock, "pre_promotion, attempt 1: failed")
        assert (await rollouts.watch(created.id)).last_state == pb.ROLLOUT_STATE_SUCCEEDED
        assert {n.digest for n in sim.nodes} == {v1}
        made = calls(receiver, "pre_promotion")
        assert [(c["step"], c["attempt"]) for c in made] == [(0, 1), (0, 2), (1, 1)], made
        first_step = [r for r in receiver.received if r.json["step"] == 0]
        assert len({r.headers["Idempotency-Key"] for r in first_step}) == 1
        assert all(r.signed_by(SECRET) for r in receiver.received)
        assert made[0]["step_nodes"] and made[0]["rollout"] == created.id
        events = [e.message for e in await rollouts.events(created.id)]
        held = events.index(next(m for m in events if "pre_promotion, attempt 1: failed (HTTP 503" in m))
        released = events.index(next(m for m in events if "pre_promotion, attempt 2: answered 200" in m))
        assert held < released < events.index("step 0 done"), events


async def test_a_gate_that_keeps_failing_pauses_and_a_resume_retries_it(
    plane: Harness, receiver: Receiver, clock: TestClock
) -> None:
    async with running(fleet(plane.address, plane.token, 1)):
        channel_id = await webhook_channel(plane, receiver.url)
        receiver.default = 500
        rollouts = Rollouts(plane.channel)
        v1 = await plane.upload(archive("v1"))
        created = await rollouts.create(
            v1,
            strategy=pb.STRATEGY_ALL_AT_ONCE,
            gates=pb.HealthGates(),
            webhooks=[gate(pb.WEBHOOK_PHASE_POST_STEP, channel_id, max_attempts=2)],
        )
        await past_backoff(rollouts, created.id, clock, "post_step, attempt 1: failed")
        paused = await rollouts.wait_state(created.id, pb.ROLLOUT_STATE_PAUSED)
        assert "webhook gate post_step at step 0 failed 2 time(s)" in paused.reason, paused.reason
        receiver.default = 200
        await rollouts.stub.ResumeRollout(pb.ResumeRolloutRequest(project="default", rollout_id=created.id))
        assert (await rollouts.watch(created.id)).last_state == pb.ROLLOUT_STATE_SUCCEEDED
        assert [c["attempt"] for c in calls(receiver, "post_step")] == [1, 2, 1]


async def test_a_gate_may_roll_back_instead_and_post_rollout_hears_the_end(
    plane: Harness, receiver: Receiver
) -> None:
    async with running(fleet(plane.address, plane.token, 1)) as sim:
        channel_id = await webhook_channel(plane, receiver.url)
        rollouts = Rollouts(plane.channel)
        v1, v2 = await plane.upload(archive("v1")), await plane.upload(archive("v2"))
        first = await rollouts.create(
            v1,
            strategy=pb.STRATEGY_ALL_AT_ONCE,
            gates=pb.HealthGates(),
            webhooks=[gate(pb.WEBHOOK_PHASE_PRE_ROLLOUT, channel_id)],
        )
        assert (await rollouts.watch(first.id)).last_state == pb.ROLLOUT_STATE_SUCCEEDED
        assert [c["rollout"] for c in calls(receiver, "pre_rollout")] == [first.id]
        receiver.default = 503
        second = await rollouts.create(
            v2,
            strategy=pb.STRATEGY_ALL_AT_ONCE,
            gates=pb.HealthGates(),
            webhooks=[
                gate(
                    pb.WEBHOOK_PHASE_PRE_PROMOTION,
                    channel_id,
                    max_attempts=1,
                    on_failure=pb.WEBHOOK_FAILURE_ROLLBACK,
                ),
                gate(pb.WEBHOOK_PHASE_POST_ROLLOUT, channel_id),
            ],
        )
        assert (await rollouts.watch(second.id)).last_state == pb.ROLLOUT_STATE_ROLLED_BACK
        assert sim.nodes[0].digest == v1 or sim.nodes[0].digest == v2
        reason = (await rollouts.get(second.id)).reason
        assert "webhook gate pre_promotion at step 0 failed 1 time(s)" in reason, reason
        receiver.default = 200

        async def heard() -> None:
            ends = [e for r in receiver.received if r.body and "events" in r.json for e in r.json["events"]]
            assert any(
                e["kind"] == "rollout.post_rollout" and e["data"]["state"] == "rolled_back" for e in ends
            )

        await eventually(heard, timeout=20, what="the post-rollout call")


async def test_bad_gates_are_refused_naming_the_field(plane: Harness, receiver: Receiver) -> None:
    async with running(fleet(plane.address, plane.token, 1)):
        channel_id = await webhook_channel(plane, receiver.url)
        rollouts = Rollouts(plane.channel)
        v1 = await plane.upload(archive("v1"))
        bad = grpc.StatusCode.INVALID_ARGUMENT
        for webhooks, field in (
            ([gate(pb.WEBHOOK_PHASE_PRE_ROLLOUT, "ch-missing")], "webhooks[0].channel_id"),
            ([gate(pb.WEBHOOK_PHASE_UNSPECIFIED, channel_id)], "webhooks[0].phase"),
            (
                [gate(pb.WEBHOOK_PHASE_POST_STEP, channel_id), gate(pb.WEBHOOK_PHASE_POST_STEP, channel_id)],
                "webhooks[1].phase",
            ),
            ([gate(pb.WEBHOOK_PHASE_POST_STEP, channel_id, max_attempts=1000)], "webhooks[0].max_attempts"),
        ):
            await expect(bad, rollouts.create(v1, strategy=pb.STRATEGY_ALL_AT_ONCE, webhooks=webhooks), field)
