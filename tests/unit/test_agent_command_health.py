"""`--proxy command`'s health sources, and a metrics file laid over a driver's metrics:
an apply command that exited 0 is never health."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent_stub.applier import ApplyRequest
from agent_stub.drivers.command import CommandDriver
from agent_stub.heartbeat import Heartbeater
from agent_stub.logs import EventLog
from controlplane.api.node.v1 import node_pb2
from tests.support.ports import nobody_listens
from tests.support.proxies import Upstream


async def accept(request: ApplyRequest) -> None:
    return None


async def test_without_a_health_source_there_is_no_health() -> None:
    assert await CommandDriver(accept).metrics("sha256:ab") is None


async def test_a_health_url_answering_2xx_is_healthy() -> None:
    up = Upstream("ok").start()
    try:
        driver = CommandDriver(accept, health_url=f"http://127.0.0.1:{up.port}/health")
        healthy = await driver.metrics("sha256:ab")
        assert healthy is not None and healthy.health == node_pb2.HEALTH_STATUS_HEALTHY
        up.set_failing(True)
        sick = await driver.metrics("sha256:ab")
        assert sick is not None and sick.health == node_pb2.HEALTH_STATUS_UNHEALTHY
    finally:
        up.stop()
    with nobody_listens() as url:
        gone = await CommandDriver(accept, health_url=f"{url}/").metrics("sha256:ab")
    assert gone is not None and gone.health == node_pb2.HEALTH_STATUS_UNHEALTHY


async def test_a_health_command_exit_code_and_its_metrics(tmp_path: Path) -> None:
    good = CommandDriver(
        accept,
        health_command='test "$BUNDLE_DIGEST" = sha256:ab && '
        'echo \'{"error_rate": 0.02, "health": "unhealthy"}\'',
    )
    metrics = await good.metrics("sha256:ab")
    assert metrics is not None
    assert metrics.health == node_pb2.HEALTH_STATUS_HEALTHY, "the exit code decides health"
    assert metrics.error_rate == pytest.approx(0.02)
    bad = await good.metrics("sha256:other")
    assert bad is not None and bad.health == node_pb2.HEALTH_STATUS_UNHEALTHY


@pytest.fixture
async def channel() -> AsyncIterator[Any]:
    ch = grpc.aio.insecure_channel("127.0.0.1:9")  # never dialled
    yield ch
    await ch.close()


async def test_a_metrics_file_overrides_the_drivers_fields(channel: Any, tmp_path: Path) -> None:
    async def proxy() -> node_pb2.NodeMetrics:
        return node_pb2.NodeMetrics(
            health=node_pb2.HEALTH_STATUS_HEALTHY, error_rate=0.01, requests_per_second=50, p99_latency_ms=12
        )

    path = tmp_path / "metrics.json"
    path.write_text('{"error_rate": 0.5, "cpu_percent": 7}')
    log = EventLog(logging.getLogger("test"))
    beats = Heartbeater(channel, lambda: "n-1", lambda: (), lambda: "", log, metrics_file=path, metrics=proxy)
    merged = await beats.metrics()
    assert merged.health == node_pb2.HEALTH_STATUS_HEALTHY
    assert (merged.error_rate, merged.cpu_percent, merged.requests_per_second) == (0.5, 7, 50)
    path.write_text("not json")
    unreadable = await beats.metrics()
    assert unreadable.error_rate == pytest.approx(0.01), "the driver's metrics, without the broken file"
