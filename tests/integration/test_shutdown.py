"""Graceful shutdown: health goes NOT_SERVING first, open streams end with a closing
bookmark and a clean status."""

from __future__ import annotations

import asyncio

from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import HarnessFactory


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
