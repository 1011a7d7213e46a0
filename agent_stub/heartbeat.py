"""Heartbeats: health and load metrics, and the digest the node runs.

Metrics come from a metrics source (the simulator's), or from `--metrics-file` (JSON,
re-read on every beat so a test or simulator can change them while the agent runs). The
agent never makes a value up: with neither, or with a file it cannot read or parse, the
beat carries health UNSPECIFIED and no metric at all (and a warning for the file), and a
field the file leaves out is absent from the beat. The server stores absence as absence,
and a health gate on a metric the node did not report fails. The next beat is due
`interval_seconds` after the server's last reply. A failed beat is logged and retried at
the next interval; it never stops the agent.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from agent_stub.logs import EventLog
from agent_stub.rpc import error_summary
from controlplane.api.node.v1 import node_pb2, node_pb2_grpc

HEALTH = {
    "healthy": node_pb2.HEALTH_STATUS_HEALTHY,
    "degraded": node_pb2.HEALTH_STATUS_DEGRADED,
    "unhealthy": node_pb2.HEALTH_STATUS_UNHEALTHY,
}
_FIELDS = ("error_rate", "p99_latency_ms", "cpu_percent", "memory_percent", "requests_per_second")


class MetricsError(ValueError):
    pass


def parse_metrics(data: Any) -> node_pb2.NodeMetrics:
    """NodeMetrics from a JSON object such as {"health": "healthy", "error_rate": 0.01}.
    What the object leaves out (or sets to null) stays absent: no health is UNSPECIFIED,
    no error_rate is no error_rate."""
    if not isinstance(data, dict):
        raise MetricsError("metrics must be a JSON object")
    health = data.get("health")
    health_value: node_pb2.HealthStatus.ValueType = node_pb2.HEALTH_STATUS_UNSPECIFIED
    if isinstance(health, str):
        if health.lower() not in HEALTH:
            raise MetricsError(f"health {health!r} is not one of {', '.join(HEALTH)}")
        health_value = HEALTH[health.lower()]
    elif isinstance(health, int) and not isinstance(health, bool) and health in HEALTH.values():
        health_value = node_pb2.HealthStatus.ValueType(health)
    elif health is not None:
        raise MetricsError(f"health {health!r} is not valid")
    values: dict[str, float] = {}
    for name in _FIELDS:
        value = data.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MetricsError(f"{name} must be a number, not {value!r}")
        values[name] = float(value)
    return node_pb2.NodeMetrics(health=health_value, **values)


def unknown_metrics() -> node_pb2.NodeMetrics:
    """What a node without a (readable) metrics source knows: nothing. Health
    UNSPECIFIED and no values, so no gate mistakes it for a healthy, idle node."""
    return node_pb2.NodeMetrics(health=node_pb2.HEALTH_STATUS_UNSPECIFIED)


def read_metrics_file(path: Path) -> node_pb2.NodeMetrics:
    try:
        return parse_metrics(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError) as e:
        raise MetricsError(f"cannot read {path}: {e}") from None


MetricsSource = Callable[[], Awaitable[node_pb2.NodeMetrics]]


class Heartbeater:
    def __init__(
        self,
        channel: Any,
        node_id: Callable[[], str],
        metadata: Callable[[], tuple[tuple[str, str], ...]],
        applied_digest: Callable[[], str],
        log: EventLog,
        interval: float = 10.0,
        metrics_file: Path | None = None,
        metrics: MetricsSource | None = None,
        timeout: float = 10.0,
    ):
        self._stub = node_pb2_grpc.NodeServiceStub(channel)
        self._node_id = node_id
        self._metadata = metadata
        self._applied = applied_digest
        self._log = log
        self.default_interval = interval
        self.interval = interval
        self.metrics_file = metrics_file
        self._metrics = metrics
        self.timeout = timeout
        self.sent = 0
        self.failures = 0

    async def metrics(self) -> node_pb2.NodeMetrics:
        if self._metrics is not None:
            return await self._metrics()
        if self.metrics_file is None:
            return unknown_metrics()
        try:
            return read_metrics_file(self.metrics_file)
        except MetricsError as e:
            self._log.warning(
                "heartbeat.metrics_unreadable", error=str(e), detail="sending no metrics (health unknown)"
            )
            return unknown_metrics()

    async def beat(self) -> bool:
        node_id = self._node_id()
        if not node_id:
            return False
        request = node_pb2.HeartbeatRequest(
            node_id=node_id, metrics=await self.metrics(), applied_digest=self._applied()
        )
        try:
            reply = await self._stub.Heartbeat(request, metadata=self._metadata(), timeout=self.timeout)
        except (TimeoutError, grpc.RpcError) as e:
            self.failures += 1
            summary = error_summary(e) if isinstance(e, grpc.RpcError) else "timed out"
            self._log.warning("heartbeat.failed", error=summary, retry_in=self.interval)
            return False
        self.sent += 1
        self.interval = float(reply.interval_seconds) or self.default_interval
        self._log.debug("heartbeat.sent", next_in=self.interval)
        return True

    async def run(self, ready: asyncio.Event) -> None:
        """Beat forever once `ready` (the node has an identity)."""
        await ready.wait()
        while True:
            try:
                await self.beat()
            except Exception as e:
                self.failures += 1
                self._log.exception("heartbeat.error", error=repr(e))
            await asyncio.sleep(self.interval)
