"""NotificationWorker: from the outbox to the receivers, at least once, on one replica.

Each pass, under the lease `notifications` (every write fenced by its epoch):

1. **Dispatch.** Undispatched events are routed to the channels of their project that
   want their kind, and stamped dispatched in the same transaction. Events of one kind
   for one channel join the message that is waiting to be sent (not attempted yet:
   inside its group window, or held by the rate limit), or start one that waits the
   channel's group window for more. So a restart that takes 1,000 nodes offline is one
   message, not 1,000.
2. **Deliver.** Every message due is sent (at most `rate_per_minute` new messages a
   minute per channel; the rest wait, and keep collecting events). An attempt is
   counted, and the message's next try pushed past the attempt, *before* it is made:
   attempt numbers only rise, and a worker that dies mid-attempt leaves a message that
   the next holder of the lease sends again — with the same idempotency keys, so a
   receiver can drop the duplicate. A failure retries after an exponential backoff
   (`BACKOFF_BASE` · 2^(attempt-1), at most `BACKOFF_CAP`); past the channel's
   `max_attempts` the message is DEAD, for an operator to list and redeliver.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

from controlplane.domain.audit.context import acting_as, system
from controlplane.domain.kernel.secrets import new_id
from controlplane.domain.kernel.wakeup import Wakeup
from controlplane.domain.leases import Leases
from controlplane.domain.model.leases import Lease, LeaseLost
from controlplane.domain.model.notify import (
    SERVER,
    Channel,
    EventKind,
    Message,
    MessageState,
    NotificationEvent,
)
from controlplane.domain.ports import Clock, NotificationSender, Store

log = logging.getLogger(__name__)

LEASE = "notifications"
# Events routed per transaction: bounded, so one pass never holds the database long.
DISPATCH_BATCH = 1000
# Messages sent per pass, and at once: a slow receiver holds up at most its own sends.
DELIVER_BATCH = 200
CONCURRENCY = 16
# A message holds at most this many events; a bigger storm starts a second one.
MAX_EVENTS = 1000
# Retry after 1 s, 2 s, 4 s, ... at most 5 min: quick over a blip, gentle on an outage.
BACKOFF_BASE = timedelta(seconds=1)
BACKOFF_CAP = timedelta(minutes=5)
# How long an attempt may take before the message may be tried again (by anyone).
ATTEMPT_TIMEOUT = timedelta(seconds=15)


def backoff(attempt: int) -> timedelta:
    """The wait after failed attempt number `attempt` (1-based)."""
    wait: timedelta = BACKOFF_BASE * (2 ** min(attempt - 1, 20))
    return min(BACKOFF_CAP, wait)


@dataclass
class PassResult:
    dispatched: int = 0
    delivered: int = 0
    failed: int = 0
    dead: int = 0
    # Seconds from each delivered event's commit to its delivery.
    latencies: list[float] = field(default_factory=list)


@dataclass
class NotificationWorker:
    store: Store
    clock: Clock
    leases: Leases
    sender: NotificationSender
    # The safety-net period; an emitted event wakes the worker of its process at once.
    interval: float = 1.0
    on_pass: Callable[[PassResult], None] = lambda result: None
    wakeup: Wakeup = field(default_factory=Wakeup)
    _lease: Lease | None = None

    def wake(self) -> None:
        self.wakeup()

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self.wakeup.wait()
            self.wakeup.clear()
            try:
                self.on_pass(await self.run_once())
            except asyncio.CancelledError:
                raise
            except LeaseLost:
                log.warning("lost the notifications lease to another replica")
                self._lease = None
            except Exception:
                log.warning("notification pass failed", exc_info=True)

    async def stop(self) -> None:
        if self._lease is not None:
            with contextlib.suppress(Exception):
                await self.leases.release(self._lease)
            self._lease = None

    async def run_once(self) -> PassResult:
        result = PassResult()
        lease = await self._hold()
        if lease is None:
            return result
        with acting_as(system("notifications")):
            while True:
                moved = await self.dispatch(lease)
                result.dispatched += moved
                if moved < DISPATCH_BATCH:
                    break
            await self.deliver(lease, result)
        return result

    async def _hold(self) -> Lease | None:
        lease = self._lease
        if lease is not None and not self.leases.valid(lease):
            lease = None
        if lease is not None and not self.leases.due(lease):
            return lease
        self._lease = await (self.leases.renew(lease) if lease is not None else self.leases.acquire(LEASE))
        if lease is None and self._lease is not None:
            log.info("delivering notifications as %s (lease epoch %d)", self._lease.holder, self._lease.epoch)
        return self._lease

    async def dispatch(self, lease: Lease) -> int:
        now = self.clock()
        async with self.store.write() as tx:
            await Leases.fence(tx, lease)
            events = await tx.notify.undispatched(DISPATCH_BATCH)
            if not events:
                return 0
            channels = await tx.notify.channels()
            groups: dict[tuple[str, str], list[NotificationEvent]] = {}
            by_id = {c.id: c for c in channels}
            for event in events:
                for channel in channels:
                    if event.kind == EventKind.ROLLOUT_POST_ROLLOUT:
                        # A gate names its channel: whatever the channel subscribes to.
                        if channel.id == event.data.get("channel") and channel.enabled:
                            groups.setdefault((channel.id, event.kind), []).append(event)
                        continue
                    if event.project in (channel.project, SERVER) and channel.wants(event.kind):
                        groups.setdefault((channel.id, event.kind), []).append(event)
            for (channel_id, kind), grouped in groups.items():
                channel = by_id[channel_id]
                for start in range(0, len(grouped), MAX_EVENTS):
                    part = grouped[start : start + MAX_EVENTS]
                    waiting = await tx.notify.open_message(channel_id, kind)
                    if (
                        waiting is not None
                        and len(waiting.events) + len(part) <= MAX_EVENTS
                        and await tx.notify.extend_message(waiting.id, part)
                    ):
                        continue
                    await tx.notify.insert_message(
                        Message(
                            id=new_id("msg"),
                            channel_id=channel_id,
                            project=channel.project,
                            kind=kind,
                            events=part,
                            state=MessageState.PENDING,
                            created_at=now,
                            next_attempt_at=now + channel.group_window,
                        )
                    )
            await tx.notify.mark_dispatched([e.id for e in events], now)
        return len(events)

    async def deliver(self, lease: Lease, result: PassResult) -> None:
        now = self.clock()
        async with self.store.read() as tx:
            due = await tx.notify.due(now, DELIVER_BATCH)
            channels = {c.id: c for c in await tx.notify.channels()} if due else {}
        gate = asyncio.Semaphore(CONCURRENCY)
        started: dict[str, int] = {}

        async def one(message: Message) -> None:
            channel = channels.get(message.channel_id)
            if channel is None:
                return
            async with gate:
                await self._attempt(lease, channel, message, started, result)

        await asyncio.gather(*(one(m) for m in due))

    async def _attempt(
        self, lease: Lease, channel: Channel, message: Message, started: dict[str, int], result: PassResult
    ) -> None:
        now = self.clock()
        async with self.store.write() as tx:
            await Leases.fence(tx, lease)
            if not channel.enabled:
                await tx.notify.record(
                    message.id, message.attempts, MessageState.PENDING, message.last_status,
                    "channel disabled", now + timedelta(minutes=1), None,
                )  # fmt: skip
                return
            if message.attempts == 0:
                # The rate limit counts new messages; retries of one already begun pass.
                if channel.id not in started:
                    started[channel.id] = await tx.notify.started_since(
                        channel.id, now - timedelta(minutes=1)
                    )
                if started[channel.id] >= channel.rate_per_minute:
                    wait = timedelta(seconds=60 / channel.rate_per_minute)
                    held = "held by the channel's rate limit"
                    await tx.notify.record(message.id, 0, MessageState.PENDING, 0, held, now + wait, None)
                    return
                started[channel.id] += 1
            if not await tx.notify.begin_attempt(message.id, message.attempts, now + ATTEMPT_TIMEOUT):
                return
        attempt = message.attempts + 1
        status, error = await self.sender.send(channel, message, attempt)
        now = self.clock()
        async with self.store.write() as tx:
            await Leases.fence(tx, lease)
            if not error:
                await tx.notify.record(message.id, attempt, MessageState.DELIVERED, status, "", now, now)
                result.delivered += 1
                wall = time.time()
                result.latencies += [max(0.0, wall - e.at.timestamp()) for e in message.events]
                return
            dead = attempt >= channel.max_attempts
            state = MessageState.DEAD if dead else MessageState.PENDING
            await tx.notify.record(message.id, attempt, state, status, error, now + backoff(attempt), None)
        if dead:
            result.dead += 1
            log.warning("notification %s to channel %s is dead after %d attempts: %s",
                        message.id, channel.name, attempt, error)  # fmt: skip
        else:
            result.failed += 1
