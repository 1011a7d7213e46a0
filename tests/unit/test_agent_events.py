"""The event handler: events in order, the cursor only behind durable applies, parking."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from agent_stub.applier import Downloaded, Target
from agent_stub.errors import ApplyFailed, TransientFailure
from agent_stub.events import EventHandler
from agent_stub.logs import EventLog
from agent_stub.state import Cursor, FileStateStore, MemoryStateStore, StateStore
from controlplane.api.watch.v1 import watch_pb2 as pb
from tests.support.eventually import eventually

A = "sha256:" + "a" * 64
B = "sha256:" + "b" * 64
C = "sha256:" + "c" * 64


class FakeInstaller:
    def __init__(self) -> None:
        self.active = ""
        self.gate: asyncio.Event | None = None
        self.fail: dict[str, Exception] = {}
        self.installs: list[Target] = []
        self.reweights: list[int] = []
        self.refuse_weight: int | None = None

    def active_digest(self) -> str:
        return self.active

    async def reweight(self, target: Target, node_id: str) -> None:
        if target.traffic_weight == self.refuse_weight:
            raise ApplyFailed("proxy refused the weight")
        self.reweights.append(target.traffic_weight)

    async def install(self, target: Target, node_id: str, downloaded: Downloaded) -> None:
        self.installs.append(target)
        await downloaded()
        if self.gate is not None:
            await self.gate.wait()
        error = self.fail.get(target.digest)
        if error is not None:
            raise error
        self.active = target.digest


class FakeReporter:
    def __init__(self) -> None:
        self.reports: list[tuple[str, int, str, str, str]] = []
        self.flushes = 0
        self.pending: object = None

    async def report(self, stream_id: str, revision: int, digest: str, phase: str, error: str = "") -> bool:
        self.reports.append((stream_id, revision, digest, phase, error))
        return True

    async def flush(self) -> None:
        self.flushes += 1

    def phases(self) -> list[tuple[str, int, str]]:
        return [(phase, revision, digest) for _, revision, digest, phase, _ in self.reports]


def started(stream: str = "s1", epoch: str = "e1", mode: Any = pb.STREAM_MODE_BOOTSTRAP) -> pb.WatchEvent:
    return pb.WatchEvent(started=pb.StreamStarted(stream_id=stream, epoch=epoch, mode=mode, head_revision=9))


def desired(revision: int, digest: str = "", assigned: int = 0, weight: int = 100) -> pb.WatchEvent:
    return pb.WatchEvent(
        desired=pb.DesiredState(
            revision=revision, digest=digest, assigned_revision=assigned or revision, traffic_weight=weight
        )
    )


def snapshot_end(revision: int) -> pb.WatchEvent:
    return pb.WatchEvent(snapshot_end=pb.SnapshotEnd(revision=revision))


def bookmark(revision: int, closing: bool = False) -> pb.WatchEvent:
    return pb.WatchEvent(bookmark=pb.Bookmark(revision=revision, closing=closing))


def message(*events: pb.WatchEvent) -> pb.WatchBundlesResponse:
    return pb.WatchBundlesResponse(events=list(events))


def make(state: StateStore | None = None) -> tuple[EventHandler, FakeInstaller, FakeReporter]:
    installer = FakeInstaller()
    reporter = FakeReporter()
    handler = EventHandler(
        state or MemoryStateStore(),
        installer,
        reporter,  # type: ignore[arg-type]
        EventLog(logging.getLogger("test")),
        node_id="n-1",
    )
    return handler, installer, reporter


async def test_cursor_is_persisted_only_after_the_apply(tmp_path: Path) -> None:
    handler, installer, reporter = make(FileStateStore(tmp_path))
    installer.gate = asyncio.Event()
    task = asyncio.create_task(handler.handle(message(started(), desired(5, A), snapshot_end(5))))

    async def applying() -> None:
        assert installer.installs, "install not started"

    await eventually(applying, what="install started")
    # Downloaded and being applied, but nothing durable says so yet.
    assert FileStateStore(tmp_path).load_cursor() == Cursor()
    assert reporter.phases() == [("DOWNLOADED", 5, A)]
    installer.gate.set()
    await task
    cursor = FileStateStore(tmp_path).load_cursor()
    assert (cursor.revision, cursor.epoch, cursor.applied_digest) == (5, "e1", A)
    assert reporter.phases() == [("DOWNLOADED", 5, A), ("ACTIVE", 5, A)]
    assert {r[0] for r in reporter.reports} == {"s1"}


async def test_transient_failure_leaves_the_cursor_alone() -> None:
    handler, installer, reporter = make()
    await handler.handle(message(started(), desired(3, A), snapshot_end(3)))
    installer.fail[B] = TransientFailure("download broke", code="UNAVAILABLE")
    with pytest.raises(TransientFailure):
        await handler.handle(message(desired(6, B), bookmark(6)))
    assert handler.cursor.revision == 3
    assert handler.cursor.failed is None
    assert installer.active == A
    assert "FAILED" not in [p for p, _, _ in reporter.phases()]


async def test_nack_is_recorded_reported_and_parked() -> None:
    handler, installer, reporter = make()
    await handler.handle(message(started(), desired(3, A), snapshot_end(3)))
    installer.fail[B] = ApplyFailed("apply command exited with code 1")
    await handler.handle(message(desired(6, B)))
    assert installer.active == A
    cursor = handler.cursor
    assert cursor.revision == 6
    assert cursor.failed is not None
    assert (cursor.failed.digest, cursor.failed.revision) == (B, 6)
    assert reporter.reports[-1] == ("s1", 6, B, "FAILED", "apply command exited with code 1")
    tries = len(installer.installs)

    # Reconnect: the same desired state again (a resume, or a bootstrap of the same
    # assignment at a newer head revision) is not retried.
    await handler.handle(message(started("s2", mode=pb.STREAM_MODE_RESUME), desired(6, B), bookmark(6)))
    await handler.handle(message(started("s3"), desired(8, B, assigned=6), snapshot_end(8)))
    assert len(installer.installs) == tries
    assert handler.cursor.revision == 8
    assert handler.counters.parked == 2

    # Assigning the same bytes again is a newer assignment: tried once more.
    await handler.handle(message(desired(10, B, assigned=10)))
    assert len(installer.installs) == tries + 1
    assert handler.cursor.failed is not None and handler.cursor.failed.revision == 10


async def test_a_failure_recorded_but_not_reported_is_reported_after_a_restart() -> None:
    """The agent is stopped after parking on a failure and before its FAILED report went
    out: the next time the same desired state comes, the report is sent (the server
    treats one it already holds as a replay)."""
    state = MemoryStateStore()
    handler, installer, reporter = make(state)
    await handler.handle(message(started(), desired(3, A), snapshot_end(3)))
    installer.fail[B] = ApplyFailed("apply command exited with code 1")

    report = reporter.report

    async def killed_before_failed(
        stream_id: str, revision: int, digest: str, phase: str, error: str = ""
    ) -> bool:
        if phase == "FAILED":
            raise asyncio.CancelledError  # SIGTERM lands on the send
        return await report(stream_id, revision, digest, phase, error)

    reporter.report = killed_before_failed  # type: ignore[method-assign]
    with pytest.raises(asyncio.CancelledError):
        await handler.handle(message(desired(6, B)))
    again, reinstaller, rereporter = make(state)
    reinstaller.active = A
    await again.handle(message(started("s2"), desired(7, B, assigned=6), snapshot_end(7)))
    assert reinstaller.installs == []
    assert rereporter.reports == [("s2", 6, B, "FAILED", "apply command exited with code 1")]


async def test_success_clears_the_failure() -> None:
    handler, installer, _ = make()
    await handler.handle(message(started(), desired(3, A), snapshot_end(3)))
    installer.fail[B] = ApplyFailed("no")
    await handler.handle(message(desired(4, B)))
    await handler.handle(message(desired(5, C)))
    assert handler.cursor.failed is None
    assert (handler.cursor.applied_digest, handler.cursor.previous_digest) == (C, A)


async def test_only_the_last_desired_state_of_a_message_is_applied() -> None:
    handler, installer, _ = make()
    await handler.handle(message(started(), desired(2, A), desired(3, B), desired(4, C), bookmark(4)))
    assert [t.digest for t in installer.installs] == [C]
    assert handler.cursor.revision == 4


async def test_nothing_assigned_keeps_the_bundle_and_advances() -> None:
    handler, installer, _ = make()
    installer.active = A
    await handler.handle(message(started(), desired(7, ""), snapshot_end(7)))
    assert installer.installs == []
    assert installer.active == A
    assert handler.cursor.revision == 7


async def test_already_running_digest_is_acknowledged_without_reinstalling() -> None:
    handler, installer, reporter = make()
    installer.active = A
    await handler.handle(message(started(), desired(7, A), snapshot_end(7)))
    assert installer.installs == []
    assert reporter.phases() == [("ACTIVE", 7, A)]
    assert handler.cursor.applied_digest == A


async def test_reset_drops_the_cursor_and_the_bootstrap_follows() -> None:
    state = MemoryStateStore(cursor=Cursor(revision=50, epoch="old", applied_digest=A))
    handler, installer, _ = make(state)
    installer.active = A
    reset = pb.WatchEvent(reset=pb.Reset(reason=pb.RESET_REASON_EPOCH_CHANGED, head_revision=4, epoch="e1"))
    task = asyncio.create_task(handler.handle(message(started(), reset)))
    await task
    assert (state.cursor.revision, state.cursor.epoch) == (0, "e1")
    await handler.handle(message(desired(4, B), snapshot_end(4)))
    assert (state.cursor.revision, state.cursor.epoch, state.cursor.applied_digest) == (4, "e1", B)


async def test_bookmarks_advance_and_closing_is_reported() -> None:
    handler, _, _ = make()
    assert not await handler.handle(message(started(), desired(2, ""), snapshot_end(2)))
    assert not await handler.handle(message(bookmark(5)))
    assert handler.cursor.revision == 5
    assert await handler.handle(message(bookmark(6, closing=True)))
    assert handler.cursor.revision == 6


async def test_bookmark_never_moves_the_cursor_back() -> None:
    handler, _, _ = make()
    await handler.handle(message(started(), desired(9, ""), snapshot_end(9)))
    await handler.handle(message(bookmark(4)))
    assert handler.cursor.revision == 9


async def test_started_flushes_held_back_reports() -> None:
    handler, _, reporter = make()
    await handler.handle(message(started()))
    await handler.handle(message(started("s2")))
    assert reporter.flushes == 2
    assert handler.stream.stream_id == "s2"


async def test_a_cursor_for_another_node_is_dropped() -> None:
    state = MemoryStateStore(cursor=Cursor(revision=30, epoch="e1", applied_digest=A, node_id="n-old"))
    handler, _, _ = make(state)
    handler.adopt("n-new")
    assert (state.cursor.revision, state.cursor.node_id, state.cursor.applied_digest) == (0, "n-new", A)
    handler.adopt("n-new")
    assert state.cursor_writes == 1


async def test_bookmark_flushes_a_held_back_report() -> None:
    handler, _, reporter = make()
    await handler.handle(message(started()))
    reporter.pending = object()
    await handler.handle(message(bookmark(3)))
    assert reporter.flushes == 2


async def test_a_weight_change_alone_reaches_the_proxy() -> None:
    """Blue-green: weight 0 is literal, and a new weight for the running bundle re-runs
    the apply step (the proxy must hear it) without a reinstall."""
    handler, installer, reporter = make()
    await handler.handle(message(started(), desired(3, A, weight=0), snapshot_end(3)))
    assert [t.traffic_weight for t in installer.installs] == [0]
    assert handler.cursor.applied_weight == 0
    await handler.handle(message(desired(4, A, weight=50)))
    await handler.handle(message(desired(5, A, weight=50)))  # same weight: nothing to do
    assert installer.reweights == [50]
    assert len(installer.installs) == 1
    assert handler.cursor.applied_weight == 50
    assert reporter.phases()[-2:] == [("ACTIVE", 4, A), ("ACTIVE", 5, A)]


async def test_a_refused_weight_is_a_failed_report_and_keeps_the_old_weight() -> None:
    handler, installer, reporter = make()
    await handler.handle(message(started(), desired(3, A, weight=100), snapshot_end(3)))
    installer.refuse_weight = 30
    await handler.handle(message(desired(4, A, weight=30)))
    assert reporter.reports[-1][3] == "FAILED"
    assert "traffic weight 30 refused" in reporter.reports[-1][4]
    assert handler.cursor.applied_weight == 100
    assert handler.cursor.revision == 4  # not retried on reconnect
