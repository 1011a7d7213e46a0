"""Background work of notifications: the delivery worker's loop, with its metrics."""

from __future__ import annotations

import asyncio
import contextlib

from prometheus_client import Counter, Histogram

from controlplane.domain.notify.worker import NotificationWorker, PassResult

DISPATCHED = Counter(
    "controlplane_notify_events_dispatched_total", "Outbox events routed to channels by this replica."
)
DELIVERED = Counter("controlplane_notify_messages_delivered_total", "Notification messages delivered.")
FAILED = Counter(
    "controlplane_notify_attempts_failed_total", "Delivery attempts that failed and will be retried."
)
DEAD = Counter("controlplane_notify_messages_dead_total", "Messages out of attempts (dead letters).")
LATENCY = Histogram(
    "controlplane_notify_commit_to_delivery_seconds",
    "From the commit of an event to the delivery of the message carrying it.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0),
)


def record_pass(result: PassResult) -> None:
    DISPATCHED.inc(result.dispatched)
    DELIVERED.inc(result.delivered)
    FAILED.inc(result.failed)
    DEAD.inc(result.dead)
    for seconds in result.latencies:
        LATENCY.observe(seconds)


class NotificationTasks:
    def __init__(self, worker: NotificationWorker):
        self.worker = worker
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.worker.run(), name="notifications")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.worker.stop()
