"""Graceful shutdown: health goes NOT_SERVING first, open streams end with a closing
bookmark and a clean status."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy.pool import QueuePool

from controlplane.bootstrap import App
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
