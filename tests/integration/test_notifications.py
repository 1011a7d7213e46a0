"""Notifications end to end: events written to the outbox in the transaction of the
change that causes them (here, revoking bundles), delivered by the worker to real HTTP
receivers started by the test. Retries are driven by the injectable clock (the test
jumps it past each backoff instead of waiting). Checked as: every event at least once;
every delivery of one event carries the same idempotency key; no two events share one;
the attempt number rises; the signature verifies with the channel's secret; a receiver
that never answers ends in the dead-letter state, and an operator redelivers it; a storm
is one message; a channel's secret never comes back; internal addresses are refused at
creation and, after DNS resolution, when connecting. On SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import timedelta

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from sqlalchemy import update

from controlplane.api.audit.v1 import audit_pb2
from controlplane.api.bundle.v1 import bundle_pb2
from controlplane.api.notification.v1 import notification_pb2 as pb
from controlplane.api.notification.v1 import notification_pb2_grpc
from controlplane.store.schema import audit_log
from tests.conftest import HarnessFactory
from tests.support.clock import TestClock
from tests.support.eventually import eventually
from tests.support.harness import Harness
from tests.support.receivers import Receiver
from tests.support.refusals import expect
from tests.support.rollout_fleet import archive

SECRET = "s3cret-hmac-key-do-not-show"
LOOPBACK = {"outbound_allow": ("127.0.0.0/8",), "notify_timeout": timedelta(seconds=0.5)}


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = await Receiver().start()
    yield r
    await r.stop()


def stub(plane: Harness) -> notification_pb2_grpc.NotificationServiceStub:
    return notification_pb2_grpc.NotificationServiceStub(plane.channel)


def window(seconds: float) -> Duration:
    d = Duration()
    d.FromTimedelta(timedelta(seconds=seconds))
    return d


async def channel(plane: Harness, url: str, name: str = "ops", **spec: object) -> pb.Channel:
    fields: dict[str, object] = {
        "name": name,
        "kind": pb.CHANNEL_KIND_WEBHOOK,
        "url": url,
        "secret": SECRET,
        "events": ["bundle.revoked"],
        "group_window": window(0),
    }
    fields.update(spec)
    reply = await stub(plane).CreateChannel(
        pb.CreateChannelRequest(project="default", channel=pb.ChannelSpec(**fields))  # type: ignore[arg-type]
    )
    return reply.channel


async def revoke(plane: Harness, tag: str) -> str:
    digest = await plane.upload(archive(tag))
    await plane.bundles.RevokeBundle(
        bundle_pb2.RevokeBundleRequest(project="default", digest=digest, reason=f"bad {tag}")
    )
    return digest


async def until(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    async def check() -> None:
        assert predicate(), what

    await eventually(check, timeout=timeout, what=what)


async def messages(plane: Harness, state: int = 0) -> list[pb.NotificationMessage]:
    reply = await stub(plane).ListMessages(pb.ListMessagesRequest(project="default", state=state))  # type: ignore[arg-type]
    return list(reply.messages)


async def grouped(plane: Harness, events: int) -> None:
    """Wait until one pending message holds `events` events."""

    async def check() -> None:
        pending = await messages(plane, pb.MESSAGE_STATE_PENDING)
        assert [len(m.event_ids) for m in pending] == [events], pending

    await eventually(check, timeout=20.0, what=f"one pending message of {events} events")


async def test_a_receiver_failing_twice_gets_the_event_three_times_with_one_key(
    make_harness: HarnessFactory, receiver: Receiver
) -> None:
    clock = TestClock()
    plane = await make_harness(clock=clock, **LOOPBACK)
    await channel(plane, receiver.url)
    receiver.script = [500, 500]
    digest = await revoke(plane, "v1")
    await until(lambda: len(receiver.received) == 1, "the first attempt")
    for n in (2, 3):
        # Past the backoff (1 s, then 2 s) on the server's clock: the retry is due.
        clock.advance(timedelta(seconds=2 ** (n - 2) + 0.1))
        await until(lambda n=n: len(receiver.received) == n, f"attempt {n}")  # type: ignore[misc]
    await until(lambda: bool(receiver.received), "deliveries")
    bodies = [r.json for r in receiver.received]
    assert [r.headers["X-Controlplane-Attempt"] for r in receiver.received] == ["1", "2", "3"]
    assert [b["attempt"] for b in bodies] == [1, 2, 3]
    assert len({r.headers["Idempotency-Key"] for r in receiver.received}) == 1
    keys = {e["idempotency_key"] for b in bodies for e in b["events"]}
    assert len(keys) == 1, keys
    assert all(r.signed_by(SECRET) for r in receiver.received)
    assert not receiver.received[0].signed_by("another key")
    event = bodies[-1]["events"][0]
    assert event["kind"] == "bundle.revoked" and event["data"]["digest"] == digest

    async def delivered() -> None:
        listed = await messages(plane)
        assert len(listed) == 1, listed
        message = listed[0]
        assert message.state == pb.MESSAGE_STATE_DELIVERED and message.attempts == 3
        assert message.last_status == 200

    await eventually(delivered, what="the message delivered")


async def test_a_receiver_that_never_answers_ends_dead_and_is_redelivered(
    make_harness: HarnessFactory, receiver: Receiver
) -> None:
    clock = TestClock()
    plane = await make_harness(clock=clock, **LOOPBACK)
    await channel(plane, receiver.url, max_attempts=2)
    receiver.script = ["hang", "hang"]
    await revoke(plane, "v1")
    await until(lambda: len(receiver.received) == 1, "the first attempt")

    async def failed_once() -> None:
        listed = await messages(plane)
        assert len(listed) == 1, listed
        message = listed[0]
        assert message.attempts == 1 and "no answer within" in message.last_error, message

    await eventually(failed_once, what="the first attempt timed out")
    clock.advance(timedelta(seconds=1.1))

    async def dead() -> pb.NotificationMessage:
        listed = await messages(plane, pb.MESSAGE_STATE_DEAD)
        assert len(listed) == 1, listed
        return listed[0]

    message = await eventually(dead, what="the dead letter")
    assert message.attempts == 2 and len(receiver.received) == 2
    # An operator lists it and sends it again; the attempt count goes on rising.
    redelivered = await stub(plane).RedeliverMessage(
        pb.RedeliverMessageRequest(project="default", message_id=message.id)
    )
    assert redelivered.message.state == pb.MESSAGE_STATE_PENDING
    await until(lambda: len(receiver.received) == 3, "the redelivery")
    assert receiver.received[-1].headers["X-Controlplane-Attempt"] == "3"
    assert len({r.headers["Idempotency-Key"] for r in receiver.received}) == 1
    await expect(
        grpc.StatusCode.NOT_FOUND,
        stub(plane).RedeliverMessage(pb.RedeliverMessageRequest(project="default", message_id="msg-x")),
        "message_id",
    )
    listed = await audit_actions(plane)
    assert "notify.redeliver" in listed


async def audit_actions(plane: Harness) -> list[str]:
    listed = await plane.audit.ListAuditEvents(audit_pb2.ListAuditEventsRequest(page_size=1000))
    return [e.action for e in listed.events]


async def test_a_storm_is_one_message_and_the_rate_limit_holds_the_next(
    make_harness: HarnessFactory, receiver: Receiver
) -> None:
    clock = TestClock()
    plane = await make_harness(clock=clock, **LOOPBACK)
    # A window longer than the storm (on the server's clock, which the test holds).
    await channel(plane, receiver.url, group_window=window(5), rate_per_minute=1)
    digests = [await revoke(plane, f"v{i}") for i in range(12)]
    # The worker groups events as it reads them, after the writes return: the window may
    # close (the clock moves) only once it holds all twelve.
    await grouped(plane, 12)
    clock.advance(timedelta(seconds=6))
    await until(lambda: len(receiver.received) == 1, "one message for the storm")
    events = receiver.received[0].json["events"]
    assert sorted(e["data"]["digest"] for e in events) == sorted(digests)
    keys = [e["idempotency_key"] for e in events]
    assert len(set(keys)) == len(keys) == 12
    # More of the same kind: the rate limit (1 a minute) holds the next message ...
    await revoke(plane, "late")
    clock.advance(timedelta(seconds=6))

    async def held() -> None:
        pending = await messages(plane, pb.MESSAGE_STATE_PENDING)
        assert pending and "rate limit" in pending[0].last_error, pending

    await eventually(held, what="the second message held")
    assert len(receiver.received) == 1
    # ... until a minute has passed.
    clock.advance(timedelta(seconds=61))
    await until(lambda: len(receiver.received) == 2, "the held message sent")
    assert len(receiver.received[1].json["events"]) == 1


async def test_channels_keep_their_secret_and_refuse_internal_addresses(
    make_harness: HarnessFactory, receiver: Receiver
) -> None:
    plane = await make_harness(**LOOPBACK)
    made = await channel(plane, receiver.url)
    assert made.has_secret and made.id
    got = (await stub(plane).GetChannel(pb.GetChannelRequest(project="default", channel_id=made.id))).channel
    assert got.has_secret and SECRET not in str(got)
    new_secret = "rotated-secret-value"
    await stub(plane).UpdateChannel(
        pb.UpdateChannelRequest(project="default", channel_id=made.id, secret=new_secret, enabled=True)
    )
    listed = await plane.audit.ListAuditEvents(audit_pb2.ListAuditEventsRequest(page_size=1000))
    text = str(listed)
    assert "notify.channel.update" in text and SECRET not in text and new_secret not in text
    bad = grpc.StatusCode.INVALID_ARGUMENT
    for url, field in (
        ("http://169.254.169.254/latest/meta-data", "channel.url"),
        ("http://[fe80::1]/hook", "channel.url"),
        ("ftp://example.com/hook", "channel.url"),
    ):
        await expect(bad, channel(plane, url, name="bad"), field)
    await expect(bad, channel(plane, receiver.url, name="bad", events=["rollout.exploded"]), "channel.events")
    await expect(
        bad,
        channel(plane, receiver.url, name="pd", kind=pb.CHANNEL_KIND_PAGERDUTY, secret=""),
        "channel.secret",
    )
    await expect(grpc.StatusCode.ALREADY_EXISTS, channel(plane, receiver.url), "channel.name")


async def test_a_name_resolving_to_loopback_is_refused_when_connecting(
    make_harness: HarnessFactory, receiver: Receiver
) -> None:
    """Without an allow for loopback, `localhost` passes creation (a name) and is refused
    after DNS resolution: nothing reaches the receiver, the reason is recorded."""
    plane = await make_harness(notify_timeout=timedelta(seconds=0.5))
    await channel(plane, f"http://localhost:{receiver.port}/hook")
    await revoke(plane, "v1")

    async def refused() -> None:
        listed = await messages(plane)
        assert len(listed) == 1, listed
        message = listed[0]
        assert message.attempts == 1 and "forbidden" in message.last_error, message

    await eventually(refused, what="the refused attempt")
    assert receiver.received == []
    # A literal loopback address is refused at creation.
    await expect(grpc.StatusCode.INVALID_ARGUMENT, channel(plane, receiver.url, name="literal"), "loopback")


async def test_redirects_and_huge_answers_are_failed_attempts(
    make_harness: HarnessFactory, receiver: Receiver
) -> None:
    clock = TestClock()
    plane = await make_harness(clock=clock, **LOOPBACK)
    await channel(plane, receiver.url, max_attempts=2)
    receiver.script = ["redirect", "huge"]
    await revoke(plane, "v1")

    async def first() -> None:
        listed = await messages(plane)
        assert len(listed) == 1, listed
        message = listed[0]
        assert message.attempts == 1 and "redirected" in message.last_error, message

    await eventually(first, what="the redirect refused")
    clock.advance(timedelta(seconds=1.1))

    async def dead() -> None:
        listed = await messages(plane, pb.MESSAGE_STATE_DEAD)
        assert len(listed) == 1, listed
        message = listed[0]
        assert "over" in message.last_error and "bytes" in message.last_error, message

    await eventually(dead, what="the huge answer refused")
    assert len(receiver.received) == 2


async def test_a_tampered_audit_chain_is_found_by_the_periodic_check_and_notified(
    make_harness: HarnessFactory, receiver: Receiver
) -> None:
    plane = await make_harness(audit_verify_interval=timedelta(seconds=0.3), **LOOPBACK)
    await channel(plane, receiver.url, events=["audit.verification_failed"])
    await revoke(plane, "v1")  # more entries in the chain
    async with plane.app.engine.begin() as conn:
        await conn.execute(update(audit_log).where(audit_log.c.seq == 2).values(actor="operator:mallory"))
    await until(lambda: len(receiver.received) == 1, "the verification failure delivered", timeout=30)
    (event,) = receiver.received[0].json["events"]
    assert event["kind"] == "audit.verification_failed" and event["data"]["first_bad_seq"] == 2, event
    # Reported once, not on every pass: several passes later, still one.
    passes = plane.app.audit_watch
    await until(lambda: passes.checks >= 3, "more verification passes")
    assert len(receiver.received) == 1
