"""One open WatchBundles stream and its send path.

There is no queue task and no generator per stream: the hub writes straight into the
call. At most one write is in flight per call (grpc refuses a second); whatever arrives
meanwhile waits in `pending` and goes out as one coalesced message when the write
returns. A stream blocked by HTTP/2 flow control only holds itself up. When `pending`
overflows, the stream is marked lagging, its queue is dropped, and once the stuck write
returns it catches up with the latest state instead of the backlog.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from typing import Protocol

from controlplane.domain.kernel.errors import DomainError
from controlplane.domain.model.desired import Effective
from controlplane.watch import metrics

log = logging.getLogger(__name__)

# Events waiting behind one in-flight write. Each hub batch adds at most one event per
# stream and bookmarks are only sent to idle streams, so 16 means sixteen changes for one
# node arrived while a single write was stuck: that consumer is not keeping up.
MAX_PENDING = 16
# How many recent deliveries a stream remembers to check acknowledgements against.
LEDGER_SIZE = 32


class Tally:
    """Writes a fan-out started that have not returned yet; `wait()` resolves when at most
    `threshold` are left."""

    __slots__ = ("outstanding", "threshold", "waiter")

    def __init__(self) -> None:
        self.outstanding = 0
        self.threshold = 0
        self.waiter: asyncio.Future[None] | None = None

    def written(self) -> None:
        self.outstanding -= 1
        waiter = self.waiter
        if waiter is not None and self.outstanding <= self.threshold and not waiter.done():
            waiter.set_result(None)

    async def wait(self, threshold: int) -> None:
        if self.outstanding <= threshold:
            return
        self.threshold = threshold
        self.waiter = asyncio.get_running_loop().create_future()
        await self.waiter


class Sink(Protocol):
    async def write(self, payload: bytes) -> None: ...


class WatchStream:
    __slots__ = (
        # Tests check with a weak reference that an ended stream is freed.
        "__weakref__",
        "_catch_up",
        "_loop",
        "closing",
        "cursor",
        "done",
        "in_flight",
        "keys",
        "labels",
        "lagging",
        "last_effective",
        "ledger",
        "node_id",
        "paced",
        "pending",
        "project",
        "sink",
        "stream_id",
        "wheel_slot",
    )

    def __init__(
        self,
        stream_id: str,
        node_id: str,
        project: str,
        labels: dict[str, str],
        sink: Sink,
        catch_up: Callable[[WatchStream], bytes],
    ):
        self.stream_id = stream_id
        self.node_id = node_id
        self.project = project
        self.labels = labels
        self.sink = sink
        self._catch_up = catch_up
        # Watch keys whose latest row can decide this node's desired state.
        self.keys: set[str] = set()
        self.last_effective: Effective | None = None
        self.cursor = 0
        self.in_flight = False
        self.pending: list[bytes] = []
        self.lagging = False
        self.closing = False
        # The hub's count of its fan-out's writes still outstanding, told when this
        # stream's next write returns.
        self.paced: Tally | None = None
        # Where the hub's bookmark wheel holds this stream (so closing it is O(1)).
        self.wheel_slot = 0
        self.ledger: collections.deque[tuple[int, str]] = collections.deque(maxlen=LEDGER_SIZE)
        self._loop = asyncio.get_running_loop()
        # Resolves when the call should end: to None for a clean end, or to the error to
        # end it with. Never to an exception: a raised error's traceback would tie the
        # handler's frame (holding this stream and the grpc call) into a cycle with this
        # future, and once gc.freeze() has moved the stream out of the collector's sight
        # that cycle is never freed.
        self.done: asyncio.Future[DomainError | None] = self._loop.create_future()

    @property
    def idle(self) -> bool:
        return not (self.in_flight or self.pending or self.lagging or self.closing)

    def deliver(self, revision: int, effective: Effective | None, payload: bytes) -> None:
        """Queue a DesiredState; remember it for acknowledgements."""
        if self.lagging or self.done.done():
            return  # the catch-up will send the latest state instead
        self.cursor = revision
        self.last_effective = effective
        if effective is not None:
            self.ledger.append((revision, effective.digest))
        self.send(payload)

    def send(self, payload: bytes) -> None:
        if self.done.done() or self.lagging:
            return
        if not self.in_flight:
            self.in_flight = True
            self._loop.create_task(self._drain(payload))
            return
        self.pending.append(payload)
        if len(self.pending) > MAX_PENDING:
            self.pending.clear()
            self.lagging = True
            metrics.LAGGING_TOTAL.inc()
            metrics.STREAMS_LAGGING.inc()

    def close(self, payload: bytes | None) -> None:
        """Send `payload` (a closing bookmark) after everything queued, then end the call."""
        if self.closing or self.done.done():
            return
        self.closing = True
        if self.lagging:
            return  # the catch-up that ends the stuck write sends the closing bookmark
        if self.in_flight:
            if payload is not None:
                self.pending.append(payload)
        elif payload is not None:
            self.in_flight = True
            self._loop.create_task(self._drain(payload))
        else:
            self._finish()

    def abort(self, error: DomainError) -> None:
        """End the call at once with `error` (the servicer turns it into a status)."""
        if not self.done.done():
            self.done.set_result(error)

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def _paced(self) -> None:
        tally, self.paced = self.paced, None
        if tally is not None:
            tally.written()

    async def _drain(self, payload: bytes | None) -> None:
        try:
            while payload is not None and not self.done.done():
                await self.sink.write(payload)
                if self.paced is not None:
                    self._paced()
                if self.lagging:
                    # Everything queued was dropped: replace it with the latest state.
                    payload = self._catch_up(self)
                    self.lagging = False
                    metrics.STREAMS_LAGGING.dec()
                    continue
                payload = b"".join(self.pending) if self.pending else None
                self.pending.clear()
        except asyncio.CancelledError:
            self._finish()
            raise
        except Exception as e:
            # The call is gone (client hung up, transport error): end the handler.
            log.debug("stream %s write failed: %r", self.stream_id, e)
            self._finish()
        finally:
            self.in_flight = False
            if self.paced is not None:
                self._paced()
            if self.lagging:
                self.lagging = False
                metrics.STREAMS_LAGGING.dec()
        if self.closing:
            self._finish()
