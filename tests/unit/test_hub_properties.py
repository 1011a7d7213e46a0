"""The watch guarantees, checked by hypothesis over random histories.

Random sequences of assignments, unassignments, relabels, pruning, connects, resumes
(from the node's cursor, from ahead of the head, from another epoch), disconnects, slow
(blocked) consumers, consumers so stuck their queue overflows, epoch changes (restores
with no relation to the old history, and promotions that lost its newest revisions and
record where they forked) and bookmark ticks, against a model that keeps the whole
history. Each guarantee is one named check:

- ORDERED: revisions on a stream never go backwards; DesiredState revisions strictly rise.
- STARTED: every stream begins with exactly one StreamStarted.
- CONSISTENT (no gap, bookmark-safe): whenever a node receives a DesiredState, a
  SnapshotEnd or a Bookmark at revision R, the bundle it holds is the model's desired
  bundle at R — so no change at or below R can still be on its way.
- CONVERGENT (latest-state-wins): once the hub has read everything and a connected
  consumer has drained, the node holds the model's current desired bundle.
- RESUMABLE: a consumer that resumes from a usable cursor (inside retained history, same
  epoch, or an earlier epoch at or below where this history forked from it) is not
  bootstrapped; any other cursor gets a reset with the right reason, floor, head and
  epoch, then a bootstrap. So no node resumes across revisions a fork lost.
- EPOCH: when the history's epoch changes, every open stream ends (UNAVAILABLE).
- WHERE: the hub's head, floor and epoch (and what StreamStarted says of them) are where
  history was when the hub last read it.

The model keeps its own account of where history is (`Where`): every write moves its head,
every prune its floor, every restore its epoch, and each read of the hub copies it. Resets
are judged against that account, never against the hub's own state: an oracle that reads
the system under test cannot catch the system's mistakes.

Which paths a run reached is counted with hypothesis `event()` (see them with
`--hypothesis-show-statistics`), and the test fails if a run never overflowed a queue,
never caught a lagging stream up, or never produced each reset reason.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TypeVar

from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from controlplane.api.watch.v1 import watch_pb2 as pb
from controlplane.domain.kernel.errors import Unavailable
from controlplane.domain.kernel.labels import Selector, meta_key, node_key, selector_key
from controlplane.domain.model.desired import ChangeKind, DesiredRow
from controlplane.watch.hub import HubSettings, WatchHub
from controlplane.watch.stream import MAX_PENDING, WatchStream
from tests.support.eventually import settle
from tests.support.memfeed import MemoryFeed
from tests.support.profiles import examples
from tests.support.sinks import RecordingSink

# Small domains make collisions (the interesting cases) frequent.
NODES = ("a", "b")
LABELS: tuple[dict[str, str], ...] = ({}, {"env": "prod"}, {"env": "prod", "zone": "1"})
SELECTORS = ("*", "env=prod", "env=prod,zone=1")
DIGESTS = ("d1", "d2")
PROJECT = "p"
T = TypeVar("T")
# How a consumer picks the cursor it connects with.
CURSORS = ("own", "zero", "stale", "ahead", "other epoch")
# Paths every run must reach, or it proves nothing about them.
MUST_REACH = frozenset(
    {
        "queue overflowed: lagging",
        "lagging stream caught up",
        "reset: RESET_REASON_TOO_OLD",
        "reset: RESET_REASON_AHEAD_OF_HEAD",
        "reset: RESET_REASON_EPOCH_CHANGED",
        "start: STREAM_MODE_RESUME",
        "epoch changed: streams ended",
        "fork: resumed at or below the fork point",
        "fork: reset above the fork point",
    }
)
REACHED: set[str] = set()


def reached(what: str) -> None:
    event(what)
    REACHED.add(what)


@dataclass
class Where:
    """Where history is, in the model's own account: the newest revision written, the
    retention floor, and the epoch."""

    head: int
    floor: int
    epoch: str
    # Earlier epochs this history continues, and the last revision it kept of each.
    forks: dict[str, int] = field(default_factory=dict)


def expected_reset(since: int, epoch: str, read: Where) -> int | None:
    """DESIGN §4.3 and §12: which reset a cursor deserves from a hub that last read
    history at `read` (None: a usable cursor, or a bootstrap asked for). The model's own
    statement of the rule, not the hub's code."""
    lost = epoch != read.epoch and not (epoch in read.forks and since <= read.forks[epoch])
    broken = (
        (lost, pb.RESET_REASON_EPOCH_CHANGED),  # another history, or past the fork from it
        (since < read.floor, pb.RESET_REASON_TOO_OLD),
        (since > read.head, pb.RESET_REASON_AHEAD_OF_HEAD),
    )
    return next((reason for rule_broken, reason in broken if rule_broken), None) if since > 0 else None


def model_desired(history: list[DesiredRow], node: str, revision: int) -> str:
    """The bundle `node` should hold at `revision`, computed from the full history."""
    latest: dict[str, DesiredRow] = {}
    for row in history:
        if row.revision <= revision:
            latest[row.key] = row
    labels = dict(latest[meta_key(node)].labels or {})
    candidates = []
    for key, row in latest.items():
        if row.kind is not ChangeKind.ASSIGN:
            continue
        if key == node_key(node) or (
            key.startswith("sel:") and Selector.parse(key.split(":", 2)[2]).matches(labels)
        ):
            candidates.append(row)
    if not candidates:
        return ""
    return max(candidates, key=lambda r: (r.pinned, r.revision)).digest


@dataclass
class Client:
    """A node agent's view: cursor, epoch and the bundle it holds."""

    cursor: int = 0
    epoch: str = ""
    digest: str = ""
    stream: WatchStream | None = None
    sink: RecordingSink | None = None
    seen: int = 0
    streams_opened: int = 0
    bootstraps: int = 0
    lagged: bool = False
    events: list[str] = field(default_factory=list)


class HubMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.clock = 10_000.0
        self.feed = MemoryFeed(epoch="epoch-1")
        # The model's account of the database, and of what the hub read of it.
        self.db = Where(head=0, floor=0, epoch="epoch-1")
        for node in NODES:
            self.wrote(self.feed.node(node, {}, PROJECT))
        self.hub = WatchHub(
            self.feed,
            HubSettings(bookmark_interval=1.0, bookmark_jitter=0.0, lifetime_min=1e9, lifetime_max=1e9),
            clock=lambda: self.clock,
        )
        self.loop.run_until_complete(self.hub.start(background=False))
        self.read_at = replace(self.db)  # start() reads everything
        self.clients = {n: Client() for n in NODES}
        self.epochs = 1
        # The head when history was last pruned: a fork keeps at least that much (a
        # prune commits after the rows it superseded with, so it is never kept alone).
        self.pruned_at = 0

    def teardown(self) -> None:
        for client in self.clients.values():
            if client.sink is not None:
                client.sink.dead = True
                client.sink.unblock()
        self.loop.run_until_complete(settle(30))
        self.loop.run_until_complete(self.hub.stop(grace=0.05))
        self.loop.close()

    @property
    def history(self) -> list[DesiredRow]:
        return self.feed.history

    def wrote(self, revision: int) -> None:
        """A write committed: one revision, the next one."""
        self.db.head += 1
        assert revision == self.db.head, f"model: the feed wrote {revision}, expected {self.db.head}"

    def run(self, coro: object) -> None:
        self.loop.run_until_complete(coro)  # type: ignore[arg-type]
        self.loop.run_until_complete(settle(30))
        self.consume()
        for client in self.clients.values():
            stream = client.stream
            if stream is not None and client.lagged and not stream.lagging:
                reached("lagging stream caught up")
            client.lagged = stream is not None and stream.lagging

    def call(self, fn: Callable[[], T]) -> T:
        """Run synchronous hub code inside the loop (it starts tasks)."""

        async def inside() -> T:
            return fn()

        return self.loop.run_until_complete(inside())

    # -- writes ------------------------------------------------------------------

    # Each write may be read by the hub at once or left to batch with later ones.

    @rule(selector=st.sampled_from(SELECTORS), digest=st.sampled_from(DIGESTS), now=st.booleans())
    def assign_selector(self, selector: str, digest: str, now: bool) -> None:
        self.wrote(self.feed.assign((selector_key(PROJECT, Selector.parse(selector)),), digest, PROJECT))
        self._maybe_read(now)

    @rule(
        node=st.sampled_from(NODES), digest=st.sampled_from(DIGESTS), pinned=st.booleans(), now=st.booleans()
    )
    def assign_node(self, node: str, digest: str, pinned: bool, now: bool) -> None:
        self.wrote(self.feed.assign((node_key(node),), digest, PROJECT, pinned=pinned))
        self._maybe_read(now)

    @rule(digest=st.sampled_from(DIGESTS), now=st.booleans())
    def assign_step(self, digest: str, now: bool) -> None:
        """A rollout step: several node keys in one revision."""
        self.wrote(self.feed.assign(tuple(node_key(n) for n in NODES), digest, PROJECT))
        self._maybe_read(now)

    @rule(key=st.sampled_from([*(f"node:{n}" for n in NODES), *SELECTORS]), now=st.booleans())
    def unassign(self, key: str, now: bool) -> None:
        full = key if key.startswith("node:") else selector_key(PROJECT, Selector.parse(key))
        self.wrote(self.feed.unassign((full,), PROJECT))
        self._maybe_read(now)

    @rule(node=st.sampled_from(NODES), labels=st.sampled_from(LABELS), now=st.booleans())
    def relabel(self, node: str, labels: dict[str, str], now: bool) -> None:
        self.wrote(self.feed.node(node, labels, PROJECT))
        self._maybe_read(now)

    def _maybe_read(self, now: bool) -> None:
        if now:
            self.read()

    @rule(behind=st.integers(0, 5), now=st.booleans())
    def prune(self, behind: int, now: bool) -> None:
        floor = max(0, self.db.head - behind)
        self.feed.prune(floor)
        self.db.floor = max(self.db.floor, floor)  # the floor never moves back
        self.pruned_at = self.db.head
        self._maybe_read(now)

    @rule()
    def change_epoch(self) -> None:
        """History rebuilt (a restore): the hub must end every stream."""
        self.epochs += 1
        self.feed.epoch = self.db.epoch = f"epoch-{self.epochs}"
        self.feed.forks = self.db.forks = {}
        self._streams_ended()

    @rule(lost=st.integers(0, 4))
    def fork(self, lost: int) -> None:
        """An asynchronous standby promoted: the newest `lost` revisions are gone and a
        new epoch records where it forked from this one."""
        # The nodes' registrations stay (a node whose registration was lost registers
        # again: another path than the watch's).
        keep = max(self.db.head - lost, self.db.floor, self.pruned_at, len(NODES))
        self.epochs += 1
        epoch = f"epoch-{self.epochs}"
        self.feed.fork(keep, epoch)
        self.db.forks = {self.db.epoch: keep, **{e: min(k, keep) for e, k in self.db.forks.items()}}
        self.db.epoch, self.db.head = epoch, keep
        self._streams_ended()

    def _streams_ended(self) -> None:
        self.read()
        for node, client in self.clients.items():
            if client.stream is None:
                continue
            done = client.stream.done
            assert done.done() and isinstance(done.result(), Unavailable), (
                f"EPOCH: {node}'s stream outlived an epoch change"
            )
            reached("epoch changed: streams ended")
            self.disconnect(node)

    # -- the hub -----------------------------------------------------------------

    @rule()
    def read(self) -> None:
        self.run(self.hub.catch_up())
        self.read_at = replace(self.db, forks=dict(self.db.forks))

    @rule()
    def tick(self) -> None:
        self.clock += 1.0
        clock = self.clock
        self.call(lambda: self.hub.tick(clock))
        self.run(settle(30))

    # -- consumers ---------------------------------------------------------------

    @initialize()
    def connect_all(self) -> None:
        for node in NODES:
            self.connect(node, "own")

    @rule(node=st.sampled_from(NODES), cursor=st.sampled_from(CURSORS))
    def reconnect(self, node: str, cursor: str) -> None:
        """The stream drops and the agent comes back at once."""
        self.disconnect(node)
        self.connect(node, cursor)

    @rule(node=st.sampled_from(NODES), cursor=st.sampled_from(CURSORS))
    def connect(self, node: str, cursor: str) -> None:
        client = self.clients[node]
        if client.stream is not None:
            return
        sink = RecordingSink()
        read = self.read_at
        since, epoch = client.cursor, client.epoch or read.epoch
        if cursor == "zero":
            since = 0
        elif cursor == "stale" and read.floor > 1:  # an agent back after a long time
            since = read.floor - 1
        elif cursor == "ahead":  # seen on a replica whose history this one lacks, say
            since = read.head + 1 + since
        elif cursor == "other epoch":
            since, epoch = max(since, 1), "an epoch from elsewhere"
        client.cursor = since  # what the agent believes it has (it lost its state, say)
        expected = expected_reset(since, epoch, read)
        if since > 0 and epoch in read.forks:
            above = since > read.forks[epoch]
            reached(f"fork: {'reset above' if above else 'resumed at or below'} the fork point")
        client.stream = self.call(lambda: self.hub.open(node, since, epoch, sink))
        client.sink, client.seen = sink, 0
        client.streams_opened += 1
        self.run(settle(30))
        started = sink.events[0].started
        assert (started.head_revision, started.floor_revision, started.epoch) == (
            read.head,
            read.floor,
            read.epoch,
        ), f"WHERE: {started} does not say where history was when the hub last read it ({read})"
        reached(f"start: {pb.StreamMode.Name(started.mode)}")
        reset = sink.events[1].reset if sink.kinds()[1:2] == ["reset"] else None
        if since > 0 and expected is None:
            assert started.mode == pb.STREAM_MODE_RESUME, "RESUMABLE: a usable cursor was bootstrapped"
            assert reset is None, "RESUMABLE: a usable cursor was reset"
            return
        assert started.mode == pb.STREAM_MODE_BOOTSTRAP, f"RESUMABLE: cursor {since} ({cursor}) resumed"
        if expected is None:
            assert reset is None, "RESUMABLE: a bootstrap asked for was reset"
            return
        assert reset is not None, f"RESUMABLE: cursor {since} ({cursor}) bootstrapped without a reset"
        reached(f"reset: {pb.ResetReason.Name(reset.reason)}")
        assert reset.reason == expected, f"RESUMABLE: {cursor} cursor {since}: {reset}"
        assert (reset.head_revision, reset.floor_revision, reset.epoch) == (
            read.head,
            read.floor,
            read.epoch,
        ), f"RESUMABLE: reset {reset} does not say where history is ({read})"

    @rule(node=st.sampled_from(NODES))
    def disconnect(self, node: str) -> None:
        client = self.clients[node]
        if client.stream is None or client.sink is None:
            return
        stream = client.stream
        self.call(lambda: self.hub.close(stream))
        client.sink.dead = True
        client.sink.unblock()
        self.run(settle(30))
        client.stream = client.sink = None

    @rule(node=st.sampled_from(NODES))
    def block(self, node: str) -> None:
        if (sink := self.clients[node].sink) is not None:
            sink.block()

    @rule(node=st.sampled_from(NODES), digest=st.sampled_from(DIGESTS))
    def flood(self, node: str, digest: str) -> None:
        """A consumer that stopped reading while its node's state keeps changing: more
        changes than its queue holds, each read by the hub on its own."""
        client = self.clients[node]
        if client.stream is None or client.sink is None:
            return
        client.sink.block()
        for i in range(MAX_PENDING + 2):
            next_digest = DIGESTS[(DIGESTS.index(digest) + i) % len(DIGESTS)]
            self.wrote(self.feed.assign((node_key(node),), next_digest, PROJECT))
            self.read()
        assert client.stream.lagging, "the stuck stream's queue never overflowed"
        reached("queue overflowed: lagging")

    @rule(node=st.sampled_from(NODES))
    def unblock(self, node: str) -> None:
        if (sink := self.clients[node].sink) is not None:
            sink.unblock()
            self.run(settle(30))

    def consume(self) -> None:
        """Each node applies what it received, checking every guarantee on the way."""
        for node, client in self.clients.items():
            if client.sink is None:
                continue
            events = client.sink.events
            for index in range(client.seen, len(events)):
                self._apply(node, client, events[index], first=index == 0)
            client.seen = len(events)

    def _apply(self, node: str, client: Client, event: pb.WatchEvent, first: bool) -> None:
        kind = event.WhichOneof("event")
        client.events.append(str(kind))
        assert (kind == "started") == first, f"STARTED: {kind} at first={first}"
        if kind == "started":
            client.epoch = event.started.epoch
            if event.started.mode == pb.STREAM_MODE_BOOTSTRAP:
                client.bootstraps += 1
            return
        if kind == "reset":
            client.cursor = 0
            return
        message = getattr(event, str(kind))
        revision = message.revision
        assert revision >= client.cursor, f"ORDERED: {kind} at {revision} after cursor {client.cursor}"
        if kind == "desired":
            assert revision > client.cursor or client.cursor == 0 or first, "ORDERED: repeated revision"
            client.digest = message.digest
        client.cursor = revision
        expected = model_desired(self.history, node, revision)
        assert client.digest == expected, (
            f"CONSISTENT: node {node} holds {client.digest!r} at {kind} {revision}, model says {expected!r}"
        )

    @invariant()
    def convergent(self) -> None:
        if self.read_at.head != self.db.head:
            return
        for node, client in self.clients.items():
            if client.sink is None or not client.sink.gate.is_set() or client.stream is None:
                continue
            if client.stream.in_flight or client.stream.pending:
                continue
            expected = model_desired(self.history, node, self.db.head)
            assert client.digest == expected, (
                f"CONVERGENT: {node} holds {client.digest!r}, model {expected!r}"
            )

    @invariant()
    def where_the_hub_read(self) -> None:
        read = self.read_at
        assert (self.hub.position, self.hub.floor, self.hub.epoch) == (read.head, read.floor, read.epoch), (
            f"WHERE: the hub is at head {self.hub.position}, floor {self.hub.floor}, epoch "
            f"{self.hub.epoch!r}; it last read history at {read}"
        )

    @precondition(lambda self: True)
    @invariant()
    def no_stream_leaks(self) -> None:
        open_ids = {c.stream.stream_id for c in self.clients.values() if c.stream is not None}
        assert self.hub.stream_count == len(open_ids)


def test_hub_guarantees() -> None:
    REACHED.clear()
    # Each run checks every guarantee on its own examples; the paths that must be reached
    # are reached by chance, so a run that missed one is followed by more (new examples),
    # a few at most: a machine that cannot reach a path still fails.
    for _ in range(4):
        run_state_machine_as_test(
            HubMachine, settings=settings(max_examples=examples(300), stateful_step_count=40, deadline=None)
        )
        if MUST_REACH <= REACHED:
            break
    missing = MUST_REACH - REACHED
    assert not missing, f"the state machine never reached: {sorted(missing)}"
