"""Graceful shutdown: health goes NOT_SERVING first, open streams end with a closing
bookmark and a clean status, and the database goes last, with nothing still using it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import text
from sqlalchemy.pool import QueuePool

from controlplane.api.node.v1 import node_pb2 as npb
from controlplane.api.project.v1 import project_pb2 as ppb
from controlplane.bootstrap import App
from controlplane.store.sql import SqlTx
from tests.conftest import HarnessFactory, fast_settings
from tests.support.eventually import eventually
from tests.support.sinks import RecordingSink


async def test_shutdown_order(make_harness: HarnessFactory) -> None:
    h = await make_harness()
    node = await h.register("n1")
    rec = h.open_watch(node)
    await rec.wait_for(lambda r: "snapshot_end" in r.kinds)
    health = health_pb2_grpc.HealthStub(h.channel).Watch(health_pb2.HealthCheckRequest(service=""))
    assert (await health.read()).status == health_pb2.HealthCheckResponse.SERVING

    stopping = asyncio.create_task(h.app.stop())
    assert (await health.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert not rec.ended.is_set() or rec.of("bookmark")[-1].closing  # health flipped before streams closed
    await rec.ended.wait()
    await stopping
    assert rec.error is None, rec.error
    last = rec.of("bookmark")[-1]
    assert last.closing
    assert last.revision == rec.last_revision()


async def test_opens_during_shutdown_are_refused_not_accepted_and_cut(make_harness: HarnessFactory) -> None:
    """After the closing bookmark an agent reconnects at once, often on the same
    connection: it must be told to go elsewhere, not get a stream that dies a moment later."""
    h = await make_harness(shutdown_grace=30.0)
    node = await h.register("n1")
    slow = await h.register("slow")
    # A consumer whose write is stuck: shutdown waits for it to drain, so the window in
    # which streams are closing but the server still answers stays open.
    stuck = RecordingSink()
    stuck.block()
    h.app.hub.open(slow.node_id, 0, h.app.hub.epoch, stuck)
    stopping = asyncio.create_task(h.app.stop())

    async def closing() -> None:
        assert h.app.hub.stopping

    await eventually(closing, what="shutdown under way")
    rec = h.open_watch(node)
    await asyncio.wait_for(rec.ended.wait(), 10)
    assert rec.events == [], rec.kinds
    assert rec.error is not None and rec.error.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in (rec.error.details() or "")
    assert "retry-after-ms" in dict(await rec.call.trailing_metadata())
    stuck.unblock()
    await stopping


async def test_a_failed_start_releases_what_it_opened(tmp_path: Path, database_url: str) -> None:
    """The port is taken: start fails with a clear error and leaves no task running and no
    connection checked out, so the same process can start again on another port."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        before = set(asyncio.all_tasks())
        clash = App(fast_settings(tmp_path, database_url, listen=f"127.0.0.1:{port}"))
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            await clash.start()
        await asyncio.sleep(0)
        assert set(asyncio.all_tasks()) <= before
        pool = clash.engine.pool
        assert isinstance(pool, QueuePool) and pool.checkedout() == 0
    again = App(fast_settings(tmp_path, database_url))
    await again.start()
    await again.stop()


def _holding_a_write(
    app: App, hold: Callable[[], Any], holding: asyncio.Event
) -> Callable[[], contextlib.AbstractAsyncContextManager[SqlTx]]:
    """The store's next write transaction, once open, runs `hold()` before it goes on:
    the call that asked for it keeps a pooled connection meanwhile."""
    original = app.store.write
    armed = [True]

    @contextlib.asynccontextmanager
    async def write() -> AsyncIterator[SqlTx]:
        async with original() as tx:
            if armed[0]:
                armed[0] = False
                holding.set()
                await hold()
            yield tx

    return write


async def _stop_releasing_every_connection(app: App, caplog: pytest.LogCaptureFixture) -> None:
    """Stop `app`; no connection may still be checked out when its pool is disposed of
    (one given back to a disposed pool is never closed: the aiosqlite or asyncpg
    connection leaks). The stop logs any it finds (`connections_in_use`)."""
    with caplog.at_level(logging.WARNING, logger="controlplane.bootstrap"):
        await app.stop()
    assert "still in use at shutdown" not in caplog.text, caplog.text


async def test_stop_waits_for_a_cancelled_call_to_give_its_connection_back(
    make_harness: HarnessFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """grpc.aio's stop cancels calls open past the grace and returns before their
    handlers unwind; the pool is disposed of only after they have (a connection given
    back to a disposed pool is never closed)."""
    h = await make_harness(shutdown_grace=0.1)
    holding = asyncio.Event()

    async def hold() -> None:
        try:
            await asyncio.sleep(30)
        finally:  # a cancelled handler still needs a moment to roll back and give it back
            await asyncio.sleep(0.3)

    monkeypatch.setattr(h.app.store, "write", _holding_a_write(h.app, hold, holding))
    call = h.projects.CreateProject(ppb.CreateProjectRequest(name="stuck"))
    await asyncio.wait_for(holding.wait(), 10)
    await _stop_releasing_every_connection(h.app, caplog)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call
    assert refused.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)


async def test_stop_waits_for_a_heartbeat_batch_whose_caller_was_cancelled(
    make_harness: HarnessFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A heartbeat commits in a batch another task writes; cancelling the call does not
    stop the batch, so the stop waits for it before the pool goes, and the beat is kept."""
    h = await make_harness(shutdown_grace=0.1)
    node = await h.register("n1")
    holding = asyncio.Event()
    monkeypatch.setattr(h.app.store, "write", _holding_a_write(h.app, lambda: asyncio.sleep(0.5), holding))
    metrics = npb.NodeMetrics(health=npb.HEALTH_STATUS_HEALTHY, p99_latency_ms=12.5)
    call = h.nodes.Heartbeat(
        npb.HeartbeatRequest(node_id=node.node_id, metrics=metrics), metadata=node.metadata
    )
    await asyncio.wait_for(holding.wait(), 10)
    await _stop_releasing_every_connection(h.app, caplog)
    with contextlib.suppress(grpc.aio.AioRpcError):
        await call
    monkeypatch.undo()
    async with h.app.store.read() as tx:
        stored = await tx.nodes.get(node.node_id)
    await h.app.engine.dispose()
    assert stored is not None and stored.last_heartbeat is not None
    assert stored.last_heartbeat.metrics.p99_latency_ms == 12.5


async def test_a_connection_still_in_use_at_the_end_of_a_stop_is_logged(
    make_harness: HarnessFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Something the stop does not know of holds a connection: it cannot be closed by the
    pool's disposal, and the log says so."""
    h = await make_harness()
    async with h.app.engine.connect() as held:
        await held.execute(text("SELECT 1"))
        with caplog.at_level(logging.WARNING, logger="controlplane.bootstrap"):
            await h.app.stop()
        await held.invalidate()  # closed here: given back, the disposed pool would keep it open
    assert "1 database connection(s) still in use at shutdown" in caplog.text
