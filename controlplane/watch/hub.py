"""WatchHub: reads every new revision once and routes it to the streams it touches.

The hub keeps an in-memory image of the desired-state log's latest row per key (the
same rows a bootstrap would read), advanced by one reader task in revision order. A
stream opens synchronously against that image at the hub's position P: its bootstrap or
resume is computed from the image at P and every later batch continues from P, so the
snapshot and the live changes share one ordering with nothing in between.

Per batch of new rows the work is O(rows + affected streams): rows are routed by key
(`node:<id>` and a router's `route:<id>` to that node's streams, a selector to the
streams whose labels match it,
found through a label index), each affected stream's effective state is resolved once,
and identical events are encoded once for every stream they go to.

Reading and fanning out are separate steps. Reading a batch updates the image, advances
the position (waking the writes that wait to be visible) and marks each affected stream
*owed* the change; a fan-out task then resolves, encodes and queues what each owed stream
is owed, a chunk of streams at a time. Between chunks it yields to the event loop and lets
most of the chunk's writes return, so the writes' replies, new calls and new reads are
not stuck behind thousands of stream writes. A stream
owed several batches by the time its turn comes gets one message with its newest state
(a watch is level-triggered). Every other stream has been handed everything up to the
position, which is what makes a bookmark at the position safe: owed streams get none
until they are paid.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from controlplane.api.watch.v1 import watch_pb2 as pb
from controlplane.domain.kernel.errors import Unauthenticated, Unavailable
from controlplane.domain.kernel.labels import Selector, parse_selector_key
from controlplane.domain.model.desired import (
    ChangeKind,
    DesiredRow,
    Effective,
    FeedPosition,
    FeedSnapshot,
)
from controlplane.domain.ports import ChangeFeed
from controlplane.watch import encoding, metrics, tracing
from controlplane.watch.heap import HeapSettler
from controlplane.watch.image import LogImage
from controlplane.watch.index import StreamIndex
from controlplane.watch.stream import Sink, Tally, WatchStream
from controlplane.watch.wheel import SLOT, BookmarkWheel

log = logging.getLogger(__name__)

# Stream ids are this many random bytes in hex; StreamStarted templates hold a placeholder
# of the same length where the id goes.
STREAM_ID_BYTES = 8
STREAM_ID_SLOT = "~" * (2 * STREAM_ID_BYTES)
STREAM_ID_SLOT_BYTES = STREAM_ID_SLOT.encode()


@dataclass(frozen=True)
class HubSettings:
    # Idle streams hear from us this often: under common 30-60 s proxy idle timeouts, and
    # an agent deadline of 3x this tells a dead stream from a quiet one.
    bookmark_interval: float = 15.0
    bookmark_jitter: float = 0.2
    # Streams end after 10-20 min (jittered) with a closing bookmark so load rebalances
    # across replicas after a deploy without every agent reconnecting at once.
    lifetime_min: float = 600.0
    lifetime_max: float = 1200.0
    # Safety-net poll when no wake-up arrives (lost NOTIFY, another writer process).
    sweep_interval: float = 1.0
    # Revisions read per query while catching up: bounds memory after a long stall.
    batch_revisions: int = 2000
    # After this long without a successful read, streams end with UNAVAILABLE so agents
    # can find a replica that reaches the database.
    degraded_after: float = 30.0
    # Streams being set up at once (past it: RESOURCE_EXHAUSTED with a retry hint).
    # Opening is cheap (no database read on the common path), so this only bites in a
    # storm far beyond what the accept loop can take.
    max_opening: int = 1024
    # A closing stream whose last write does not finish in this time is cut.
    close_grace: float = 10.0
    # After a burst of opens and closes settles for this long, freeze the heap so the
    # collector stops rescanning thousands of long-lived stream objects.
    gc_settle: float = 5.0
    # Under churn that never settles (10-20 min lifetimes alone), collect and freeze at
    # least this often. A settle collects only what is not frozen, so it costs what
    # turned over since the last one: a minute's worth at 10,000 streams is ~0.1 s of
    # loop, five minutes' ~0.4 s (watch/heap.py). Often and small, then.
    gc_refreeze_after: float = 60.0
    # A settle thaws (a full collection: ~1 s at 10,000 streams) only when an ended
    # stream was not freed, or at least this often: a cycle that holds no stream cannot
    # be seen, and this bounds how long its garbage stays frozen.
    gc_thaw_after: float = 3600.0
    # Owed streams paid per step of the fan-out; before the next step it yields to the
    # event loop and waits until all but an eighth of the step's writes have returned,
    # or `fanout_wait` s. Small enough that a write's accept and reply are not queued
    # behind more than ~1,000 stream writes, large enough that grpc still batches each
    # connection's frames (at 256 the CPU per delivery rose ~50 % at 10,000 streams).
    fanout_chunk: int = 1024
    fanout_wait: float = 0.1


class WatchHub:
    def __init__(
        self,
        feed: ChangeFeed,
        settings: HubSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.feed = feed
        self.settings = settings or HubSettings()
        self._clock = clock
        self.image = LogImage()
        self._streams = StreamIndex()
        self._wheel = BookmarkWheel()
        self._expires: dict[WatchStream, float] = {}
        # Streams owed a change the fan-out has not queued yet -> the newest revision
        # that touched them. Insertion-ordered: the oldest debt is paid first.
        self._owed: dict[WatchStream, int] = {}
        self._fanout_wakeup = asyncio.Event()
        # When the rows read since the debts were last all paid were written.
        self._unpaid_writes: set[float] = set()
        self._background = False
        # Encodings every stream opened at one head shares (a storm opens thousands at
        # the same head): the head they are for, its bookmark and snapshot end, and the
        # DesiredState of each row by id (holding the row, so no id is reused).
        self._shared_head = -1
        self._shared: dict[str, bytes] = {}
        self._shared_desired: dict[int, tuple[DesiredRow | None, bytes]] = {}
        self._wakeup = asyncio.Event()
        self._progress = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._failing_since: float | None = None
        self.degraded = False
        # Set when stop() begins: from then on opens are refused.
        self.stopping = False
        s = self.settings
        self._heap = HeapSettler(s.gc_settle, s.gc_refreeze_after, s.gc_thaw_after, clock())
        # One reader at a time (the background task, a caller's catch_up()): the image
        # and the position advance together, in revision order.
        self._reading = asyncio.Lock()
        # Reads of the log begun and finished (sync(): a read begun after a moment sees
        # everything committed before it).
        self._reads_begun = 0
        self._reads_done = 0

    # -- lifecycle -------------------------------------------------------------------

    async def start(self, background: bool = True) -> None:
        """Load the latest state; with `background`, start reading and ticking.

        Without it the caller drives the hub with `catch_up()` and `tick()`: tests do,
        to make every interleaving deterministic.
        """
        self._load(await self.feed.snapshot())
        if background:
            self._background = True
            loop = asyncio.get_running_loop()
            self._tasks = [
                loop.create_task(self._run()),
                loop.create_task(self._tick()),
                loop.create_task(self._fan_out()),
            ]

    async def catch_up(self) -> None:
        """Read and route everything committed so far, and queue what streams are owed."""
        await self._read()
        self._pay(len(self._owed))

    async def stop(self, grace: float = 5.0) -> None:
        """Refuse new streams, end every open one with a closing bookmark, stop reading.

        The refusal comes first: an agent told "closing" reconnects at once, often on
        the same connection, and must be sent elsewhere rather than accepted here and
        cut a moment later."""
        self.stopping = True
        # The closing bookmark says "you have everything up to here": pay every debt first.
        self._pay(len(self._owed))
        for stream in self._streams:
            stream.close(encoding.bookmark(self.position, closing=True))
        pending = [s.done for s in self._streams if not s.done.done()]
        if pending:
            await asyncio.wait(pending, timeout=grace)
        for stream in self._streams:
            stream.abort(Unavailable("the server is shutting down"))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    def wake(self) -> None:
        """A revision was committed (in this process or, via NOTIFY, elsewhere)."""
        self._wakeup.set()

    async def sync(self, revision: int, within: float) -> bool:
        """Make sure a revision another process committed is read before answering.

        Returns once the hub has read `revision`, or once a read of the log begun after
        this call has finished: that read saw everything committed before the call, so a
        revision it did not reach is not in this history (an epoch fork dropped it).
        False only if neither happened within `within` seconds."""
        if self.position >= revision:
            return True
        target = self._reads_begun + 1
        deadline = time.monotonic() + within
        while self.position < revision and self._reads_done < target:
            if not await self._progressed(deadline):
                return False
        return True

    async def _progressed(self, deadline: float) -> bool:
        """Wake the reader and wait for its next finished read; False once `deadline`
        (time.monotonic()) has passed first."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        self.wake()
        progress = self._progress
        try:
            async with asyncio.timeout(remaining):
                await progress.wait()
        except TimeoutError:
            return False
        return True

    @property
    def position(self) -> int:
        """The revision the hub has read and routed everything up to."""
        return self.image.position

    @property
    def floor(self) -> int:
        return self.image.floor

    @property
    def forks(self) -> dict[str, int]:
        """Earlier epochs this history continues, with the last revision kept of each."""
        return self.image.forks

    @property
    def epoch(self) -> str:
        return self.image.epoch

    # -- queries (DesiredView, DeliveryLedger) -------------------------------------------

    def head(self) -> int:
        return self.position

    def effective(self, node_id: str) -> DesiredRow | None:
        return self.image.effective(node_id)

    def was_sent(self, stream_id: str, node_id: str, revision: int, digest: str) -> bool | None:
        """True/False from the stream's own ledger; None (check the log) when the stream
        is not ours or the delivery is older than the ledger remembers."""
        stream = self._streams.by_id.get(stream_id)
        if stream is None:
            return None
        if stream.node_id != node_id:
            return False
        ledger = stream.ledger
        if (revision, digest) in ledger:
            return True
        # Revisions enter the ledger in rising order, so a full ledger has forgotten
        # exactly the deliveries at or below its oldest entry.
        if len(ledger) == ledger.maxlen and revision <= ledger[0][0]:
            return None
        return False

    def knows_node(self, node_id: str) -> bool:
        return self.image.node(node_id) is not None

    @property
    def stream_count(self) -> int:
        return len(self._streams)

    async def wait_until(
        self, node_id: str | None, revision: int, within: float, epoch: str | None = None
    ) -> bool:
        """Wait until the hub has read `revision` (and knows `node_id`, and is in
        `epoch`, if given)."""
        deadline = time.monotonic() + within
        while (
            self.position < revision
            or (node_id is not None and not self.knows_node(node_id))
            or (epoch is not None and self.epoch != epoch)
        ):
            if not await self._progressed(deadline):
                return False
        return True

    # -- streams ---------------------------------------------------------------------

    def check_accepting(self) -> None:
        """Raise Unavailable unless this hub takes new streams."""
        if self.stopping:
            metrics.REJECTED.labels("stopping").inc()
            raise Unavailable(
                "this server is shutting down; reconnect to another replica or retry", retry_after_ms=1000
            )
        if self.degraded:
            metrics.REJECTED.labels("degraded").inc()
            raise Unavailable("the control plane cannot read its database; try another replica")

    def open(self, node_id: str, since: int, epoch: str, sink: Sink) -> WatchStream:
        """Register a stream at the hub's position and queue its first message.

        The caller has made sure the hub knows the node and has read `since` (or
        decided `since` is ahead of the database head).
        """
        self.check_accepting()
        image = self.image
        info = image.node(node_id)
        assert info is not None, "the caller waits until the hub knows the node"
        project, labels = info
        stream = WatchStream(
            secrets.token_hex(STREAM_ID_BYTES), node_id, project, labels, sink, self._catch_up
        )
        stream.keys = image.keys_for(project, node_id, labels)
        head = self.position
        row = image.resolve(stream.keys, stream.node_id)
        reset = self._reset_reason(since, epoch)
        mode = pb.STREAM_MODE_RESUME if since > 0 and reset is None else pb.STREAM_MODE_BOOTSTRAP
        parts = [self._started(stream.stream_id, mode, head)]
        if reset is not None:
            metrics.RESETS.labels(pb.ResetReason.Name(reset)).inc()
            parts.append(encoding.reset(reset, self.floor, head, self.epoch))
        if mode == pb.STREAM_MODE_BOOTSTRAP:
            metrics.BOOTSTRAPS.inc()
            parts += [self._desired_at(head, row), self._mark_at(head, "snapshot_end")]
            self._record(stream, head, row)
        else:
            metrics.RESUMES.inc()
            if image.changed_at(stream.keys, node_id) > since:
                parts.append(self._desired_at(head, row))
                self._record(stream, head, row)
            else:
                stream.cursor = since
                stream.last_effective = Effective.of(row) if row else None
            parts.append(self._mark_at(head, "bookmark"))
        self._register(stream)
        stream.send(b"".join(parts))
        return stream

    def _shared_at(self, head: int) -> dict[str, bytes]:
        if head != self._shared_head:
            self._shared_head = head
            self._shared = {}
            self._shared_desired = {}
        return self._shared

    def _started(self, stream_id: str, mode: pb.StreamMode.ValueType, head: int) -> bytes:
        """StreamStarted, from a template per (epoch, mode, head, floor) with the id
        spliced in: the id is the first field, of a fixed length."""
        shared = self._shared_at(head)
        name = f"started:{mode}:{self.epoch}:{self.floor}"
        template = shared.get(name)
        if template is None:
            template = shared[name] = encoding.started(STREAM_ID_SLOT, self.epoch, mode, head, self.floor)
        at = template.index(STREAM_ID_SLOT_BYTES)
        return b"".join((template[:at], stream_id.encode(), template[at + len(STREAM_ID_SLOT_BYTES) :]))

    def _mark_at(self, head: int, kind: str) -> bytes:
        shared = self._shared_at(head)
        payload = shared.get(kind)
        if payload is None:
            payload = shared[kind] = (
                encoding.bookmark(head) if kind == "bookmark" else encoding.snapshot_end(head)
            )
        return payload

    def _desired_at(self, head: int, row: DesiredRow | None) -> bytes:
        self._shared_at(head)
        held = self._shared_desired.get(id(row))
        if held is None or held[0] is not row:
            held = self._shared_desired[id(row)] = (row, encoding.desired(head, row))
        return held[1]

    def close(self, stream: WatchStream) -> None:
        """Forget a stream whose call has ended."""
        if not self._streams.remove(stream):
            return
        self._expires.pop(stream, None)
        self._owed.pop(stream, None)
        self._wheel.remove(stream)
        self._heap.ended(stream, self._clock())
        metrics.STREAMS_OPEN.dec()

    def _reset_reason(self, since: int, epoch: str) -> pb.ResetReason.ValueType | None:
        if since <= 0:
            return None
        if epoch != self.epoch and since > self.forks.get(epoch, 0):
            # Another history, or a cursor past this history's fork from the node's
            # epoch: what the node saw there may have been lost. At or below the fork
            # point it lost nothing, and resumes.
            return pb.RESET_REASON_EPOCH_CHANGED
        if since < self.floor:
            return pb.RESET_REASON_TOO_OLD
        if since > self.position:
            return pb.RESET_REASON_AHEAD_OF_HEAD
        return None

    def _register(self, stream: WatchStream) -> None:
        self._streams.add(stream)
        now = self._clock()
        s = self.settings
        self._expires[stream] = now + random.uniform(s.lifetime_min, s.lifetime_max)
        self._schedule(stream, now)
        self._heap.opened(now)
        metrics.STREAMS_OPEN.inc()

    def _schedule(self, stream: WatchStream, now: float) -> None:
        s = self.settings
        period = s.bookmark_interval * random.uniform(1 - s.bookmark_jitter, 1 + s.bookmark_jitter)
        self._wheel.schedule(stream, now, period)

    def _record(self, stream: WatchStream, revision: int, row: DesiredRow | None) -> None:
        stream.cursor = revision
        stream.last_effective = Effective.of(row) if row else None
        if row is not None:
            stream.ledger.append((revision, row.digest))

    def _catch_up(self, stream: WatchStream) -> bytes:
        """The message that replaces a lagging stream's dropped queue."""
        head = self.position
        row = self.image.resolve(stream.keys, stream.node_id)
        self._record(stream, head, row)
        # The latest state at the head pays whatever the stream was still owed.
        self._owed.pop(stream, None)
        return encoding.desired(head, row) + encoding.bookmark(head, closing=stream.closing)

    # -- reading the log -------------------------------------------------------------

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.sweep_interval):
                    await self._wakeup.wait()
            self._wakeup.clear()
            try:
                await self._read()
            except asyncio.CancelledError:
                raise
            except Exception:
                metrics.FEED_ERRORS.inc()
                log.warning("reading the desired-state log failed", exc_info=True)
                now = time.monotonic()
                self._failing_since = self._failing_since or now
                if now - self._failing_since > self.settings.degraded_after and not self.degraded:
                    self._degrade()
                await asyncio.sleep(backoff)
                # At least once a second: a database failover is over in seconds, and the
                # promoted primary's new epoch should reach streams as soon as it serves.
                backoff = min(backoff * 2, 1.0)
                self._wakeup.set()
                continue
            backoff = 0.1
            self._failing_since = None
            self.degraded = False

    async def _read(self) -> None:
        async with self._reading:
            self._reads_begun += 1
            begun = self._reads_begun
            await self._read_locked()
            self._reads_done = begun
            self._progress.set()
            self._progress = asyncio.Event()

    async def _read_locked(self) -> None:
        pos = await self.feed.position()
        if await self._reloaded(pos):
            return
        while self.position < pos.head:
            upto = min(pos.head, self.position + self.settings.batch_revisions)
            rows = await self.feed.changes(self.position, upto)
            if not rows:
                # Revisions that wrote nothing, or the floor passed our position
                # while we read (the feed then returns nothing rather than a history
                # with holes in it): look again before moving on.
                pos = await self.feed.position()
                if await self._reloaded(pos):
                    return
            self._apply(rows, upto)

    async def _reloaded(self, pos: FeedPosition) -> bool:
        """Rebuild from a snapshot if `pos` says the log cannot be followed from our
        position (another epoch, or rows we have not read were pruned)."""
        if pos.epoch != self.epoch or pos.head < self.position:
            log.warning("history epoch changed (%s -> %s): ending every stream", self.epoch, pos.epoch)
            self._load(await self.feed.snapshot())
            for stream in self._streams:
                stream.abort(Unavailable("the server's history epoch changed; reconnect"))
            return True
        if pos.floor > self.position:
            # Rows we have not read were pruned: rebuild from the latest state instead.
            self._load(await self.feed.snapshot())
            self._resolve_all()
            return True
        if pos.floor > self.floor:
            self.image.forget_below(pos.floor)
        metrics.FLOOR.set(self.floor)
        return False

    def _load(self, snapshot: FeedSnapshot) -> None:
        # Debts against the old image are void: a reload either ends every stream or
        # re-resolves every stream (_resolve_all).
        self._owed.clear()
        self._shared_head = -1
        self.image.load(snapshot)
        self._advance(snapshot.position.head)

    def _advance(self, position: int) -> None:
        # Only a reload (_load) may set a lower position: a new epoch's history.
        self.image.position = position
        metrics.HEAD.set(position)
        self._progress.set()
        self._progress = asyncio.Event()

    def _apply(self, rows: list[DesiredRow], upto: int) -> None:
        """Route one batch. Synchronous: streams never see a half-applied batch."""
        # Tracing on: one span per change (revision), the rows carrying its context.
        traced = tracing.changes(rows)
        if traced is not None:
            rows = traced.rows
        affected: dict[WatchStream, int] = {}
        selectors: dict[str, int] = {}
        for row in rows:
            if not self.image.remember(row):
                continue
            if row.kind is ChangeKind.REVOKED:
                for stream in self._streams.of_node(row.key.split(":", 1)[1]):
                    stream.abort(Unauthenticated("this node's identity was revoked"))
                continue
            if row.kind is ChangeKind.NODE:
                node_id = row.key.split(":", 1)[1]
                labels = row.labels or {}
                for stream in self._streams.of_node(node_id):
                    self._relabel(stream, dict(labels))
                    affected[stream] = row.revision
            elif row.key.startswith(("node:", "route:")):
                # A node's own assignment, or a router's routing table: its streams only.
                for stream in self._streams.of_node(row.key.split(":", 1)[1]):
                    affected[stream] = row.revision
            else:
                selectors[row.key] = row.revision
        for key, revision in selectors.items():
            project, selector = parse_selector_key(key) or ("", Selector(()))
            for stream in self._streams.matching(project, selector):
                stream.keys.add(key)
                affected[stream] = max(affected.get(stream, 0), revision)
        # Owe, then advance (waking whoever waits for this revision, like the operator's
        # call that wrote it): the fan-out task pays the debts in chunks, so those
        # replies are not stuck behind thousands of stream writes on the loop.
        self._owe(affected)
        self._advance(upto)
        if traced is not None:
            traced.end(affected)
        self._unpaid_writes.update(r.written_at for r in rows)
        if not self._owed:
            self._observe_paid()

    def _observe_paid(self) -> None:
        """Every debt is paid: each write read since the last time is on every stream."""
        now = time.time()
        for written_at in self._unpaid_writes:
            metrics.FANOUT_LATENCY.observe(max(0.0, now - written_at))
        self._unpaid_writes.clear()

    def _owe(self, affected: dict[WatchStream, int]) -> None:
        owed = self._owed
        for stream, revision in affected.items():
            # Revisions only rise: a later batch's revision replaces an earlier one.
            owed[stream] = revision
        if owed:
            self._fanout_wakeup.set()

    async def _fan_out(self) -> None:
        chunk = max(1, self.settings.fanout_chunk)
        while True:
            await self._fanout_wakeup.wait()
            self._fanout_wakeup.clear()
            while self._owed:
                tally = self._pay(chunk)
                # Let the replies, reads and stream writes the chunk woke run first.
                await asyncio.sleep(0)
                # Then let most of the chunk's writes return before the next chunk: grpc
                # hands the loop every completion in order, so a new call (the next
                # write) would otherwise wait behind the completions of every stream's
                # write, and find nothing left to coalesce. A few streams stuck behind
                # flow control hold the fan-out up for `fanout_wait` at most.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.settings.fanout_wait):
                        await tally.wait(chunk // 8)

    def _pay(self, count: int) -> Tally:
        """Queue what the `count` longest-owed streams are owed: each one's state at the
        hub's position, under the newest revision that touched it."""
        owed = self._owed
        tally = Tally()
        if not owed:
            return tally
        if count >= len(owed):
            batch, self._owed = owed, {}
        else:
            batch = {stream: owed.pop(stream) for stream in list(itertools.islice(owed, count))}
        self._deliver(batch, tally)
        if not self._owed:
            self._observe_paid()
        return tally

    def _deliver(self, affected: dict[WatchStream, int], tally: Tally | None = None) -> None:
        # Per call, every distinct (row, revision) is resolved to an Effective and encoded
        # once, however many streams it goes to. The caches hold the rows they are keyed
        # by (by id), so no id can be reused by another row while they live.
        effective: dict[int, tuple[DesiredRow, Effective]] = {}
        encoded: dict[tuple[int, int], bytes] = {}
        image = self.image
        delivered = 0
        for stream, revision in affected.items():
            row = image.resolve(stream.keys, stream.node_id)
            if row is None:
                if stream.last_effective is None:
                    continue
                eff = None
            else:
                held = effective.get(id(row))
                if held is None:
                    held = effective[id(row)] = (row, Effective.of(row))
                eff = held[1]
                if eff.unchanged_from(stream.last_effective):
                    continue
            cache_key = (id(row), revision)
            payload = encoded.get(cache_key)
            if payload is None:
                payload = encoded[cache_key] = encoding.desired(revision, row)
            started = not stream.in_flight
            stream.deliver(revision, eff, payload)
            if tally is not None and started and stream.in_flight:
                stream.paced = tally
                tally.outstanding += 1
            delivered += 1
        if delivered:
            metrics.DELIVERIES.inc(delivered)

    def _resolve_all(self) -> None:
        """After a reload: re-route every stream from the new image and send what changed."""
        for stream in self._streams:
            info = self.image.node(stream.node_id)
            if info is None:
                stream.abort(Unavailable("the node is gone from the control plane"))
                continue
            self._relabel(stream, info[1])
        self._owe(dict.fromkeys(self._streams, self.position))

    def _relabel(self, stream: WatchStream, labels: dict[str, str]) -> None:
        self._streams.relabel(stream, labels)
        stream.keys = self.image.keys_for(stream.project, stream.node_id, labels)

    def _degrade(self) -> None:
        self.degraded = True
        log.error("no successful read for %.0f s: ending every stream", self.settings.degraded_after)
        for stream in self._streams:
            stream.abort(Unavailable("the control plane cannot read its database; reconnect"))

    # -- bookmarks, lifetimes, the heap --------------------------------------------------

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(SLOT)
            self.tick(self._clock())

    def tick(self, now: float) -> None:
        """Bookmarks, lifetimes and GC for every wheel slot up to `now`.

        A tick that comes late (a busy loop) processes the slots it passed over, so no
        stream ever drops out of the schedule.
        """
        due = self._wheel.due(now)
        payload: bytes | None = None
        sent = 0
        grace = self.settings.close_grace
        owed = self._owed
        for stream in due:
            if stream.done.done():
                continue
            expires = self._expires.get(stream, now)
            if stream in owed:
                # Not handed everything up to the position yet: neither a bookmark nor a
                # closing one until the fan-out has paid it (within a few loop turns),
                # so look again next slot rather than a whole interval later.
                self._wheel.schedule(stream, now, SLOT)
                continue
            if stream.closing:
                if now > expires + grace:
                    stream.abort(Unavailable("closing stream did not drain in time"))
                    continue
            elif now >= expires:
                stream.close(encoding.bookmark(self.position, closing=True))
                sent += 1
            elif stream.idle:
                payload = payload or encoding.bookmark(self.position)
                stream.cursor = self.position
                stream.send(payload)
                sent += 1
            self._schedule(stream, now)
        if sent:
            metrics.BOOKMARKS.inc(sent)
        self._heap.tick(now)
