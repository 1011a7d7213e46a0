"""Heartbeats: health and load metrics, and the digest the node runs.

Metrics come from a metrics source (the simulator's), or from `--metrics-file` (JSON,
re-read on every beat so a test or simulator can change them while the agent runs). The
agent never makes a value up: with neither, or with a file it cannot read or parse, the
beat carries health UNSPECIFIED and no metric at all (and a warning for the file), and a
field the file leaves out is absent from the beat. The server stores absence as absence,
and a health gate on a metric the node did not report fails. The next beat is due
`interval_seconds` after the server's last reply. A failed beat is logged and retried at
the next interval; it never stops the agent.

One bad value costs that value, never the beat. The server refuses a whole heartbeat
over one metric outside its bounds (INVALID_ARGUMENT), and a node whose beats are all
refused goes OFFLINE although it is alive — so the agent checks every field against the
same bounds first and leaves a bad one out (absent, which a gate treats as unreported),
keeping the rest. Each problem is logged once when it appears and once when it clears,
not on every beat: a broken exporter must not flood the log at the heartbeat rate.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal, NamedTuple

import grpc

from agent_stub.logs import EventLog
from agent_stub.rpc import error_summary
from controlplane.api.node.v1 import node_pb2, node_pb2_grpc

HEALTH = {
    "healthy": node_pb2.HEALTH_STATUS_HEALTHY,
    "degraded": node_pb2.HEALTH_STATUS_DEGRADED,
    "unhealthy": node_pb2.HEALTH_STATUS_UNHEALTHY,
}
# The server's bounds, inclusive (controlplane.domain.fleet.nodes.METRIC_BOUNDS), copied because
# the agent may not import the domain (import-linter); tests/unit/test_agent_metrics.py
# fails when the two differ. A value outside them would get the whole beat refused.
MetricName = Literal["error_rate", "p99_latency_ms", "cpu_percent", "memory_percent", "requests_per_second"]
METRIC_BOUNDS: dict[MetricName, tuple[float, float]] = {
    "error_rate": (0.0, 1.0),
    "p99_latency_ms": (0.0, 3.6e6),
    "cpu_percent": (0.0, 100.0),
    "memory_percent": (0.0, 100.0),
    "requests_per_second": (0.0, 1e9),
}


class MetricsError(ValueError):
    """No metrics at all could be read; `problem` names the kind (for the once-only warning)."""

    def __init__(self, message: str, problem: str):
        super().__init__(message)
        self.problem = problem


class Dropped(NamedTuple):
    """A field left out of the beat. (`field`, `problem`) identifies the problem for the
    once-only warning; `detail` says what the value was."""

    field: str
    problem: str
    detail: str


class Reading(NamedTuple):
    metrics: node_pb2.NodeMetrics
    dropped: list[Dropped]


def parse_metrics(data: Any) -> Reading:
    """NodeMetrics from a JSON object such as {"health": "healthy", "error_rate": 0.01},
    and what had to be dropped from it. What the object leaves out (or sets to null)
    stays absent: no health is UNSPECIFIED, no error_rate is no error_rate. A field that
    is not valid — an unknown health, a value that is not a number, not finite or outside
    METRIC_BOUNDS — is dropped the same way and listed, and the other fields are kept.
    Only something that is not a JSON object at all is an error."""
    if not isinstance(data, dict):
        raise MetricsError(f"metrics must be a JSON object, not {type(data).__name__}", "not an object")
    dropped: list[Dropped] = []
    health = data.get("health")
    health_value: node_pb2.HealthStatus.ValueType = node_pb2.HEALTH_STATUS_UNSPECIFIED
    if isinstance(health, str) and health.lower() in HEALTH:
        health_value = HEALTH[health.lower()]
    elif isinstance(health, int) and not isinstance(health, bool) and health in HEALTH.values():
        health_value = node_pb2.HealthStatus.ValueType(health)
    elif health is not None:
        detail = f"{_show(health)} is not one of {', '.join(HEALTH)}"
        dropped.append(Dropped("health", "unknown health", detail))
    values: dict[str, float] = {}
    for name, (low, high) in METRIC_BOUNDS.items():
        value = data.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            dropped.append(Dropped(name, "not a number", f"{_show(value)} is not a number"))
            continue
        try:
            number = float(value)
        except OverflowError:  # an integer past the largest float: certainly out of range
            digits = int(int(value).bit_length() * math.log10(2))
            dropped.append(
                Dropped(name, "out of range", f"an integer of ~{digits} digits is outside [{low}, {high}]")
            )
            continue
        values[name] = number
    checked = check_metrics(node_pb2.NodeMetrics(health=health_value, **values))
    return Reading(checked.metrics, dropped + checked.dropped)


def check_metrics(m: node_pb2.NodeMetrics) -> Reading:
    """`m` without the values the server would refuse (for a metrics source, which
    builds NodeMetrics itself and can get a value wrong as easily as a file)."""
    kept = node_pb2.NodeMetrics()
    kept.CopyFrom(m)
    dropped: list[Dropped] = []
    for name, (low, high) in METRIC_BOUNDS.items():
        if m.HasField(name) and (problem := _out_of_bounds(value := getattr(m, name), low, high)):
            kept.ClearField(name)
            dropped.append(Dropped(name, problem, f"{value} is outside [{low}, {high}]"))
    return Reading(kept, dropped)


def _out_of_bounds(value: float, low: float, high: float) -> str:
    """Why the server would refuse `value` ("" if it would not); the same test as its
    validation.bounded."""
    if not math.isfinite(value):
        return "not finite"
    return "" if low <= value <= high else "out of range"


def _show(value: Any) -> str:
    """`value` for a log line, cut short: the file may hold anything, of any size."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _json_int(text: str) -> int | float:
    """A JSON integer; one too long for any metric becomes a float (inf past 1e308) so it
    is dropped as one bad field. As an int, past 4300 digits, it would fail the whole
    parse (Python's int-from-string limit) and cost every metric."""
    return int(text) if len(text) <= 32 else float(text)


def unknown_metrics() -> node_pb2.NodeMetrics:
    """What a node without a (readable) metrics source knows: nothing. Health
    UNSPECIFIED and no values, so no gate mistakes it for a healthy, idle node."""
    return node_pb2.NodeMetrics(health=node_pb2.HEALTH_STATUS_UNSPECIFIED)


def read_metrics_file(path: Path) -> Reading:
    try:
        return parse_metrics(json.loads(path.read_text(), parse_int=_json_int))
    except (OSError, ValueError, RecursionError) as e:  # ValueError: not UTF-8, not JSON
        raise MetricsError(f"cannot read {path}: {e}", type(e).__name__) from None


# The "field" of a problem that cost every metric (no NodeMetrics field is named so).
_WHOLE = "metrics"

# None: the source knows nothing this time (a driver before its first bundle).
MetricsSource = Callable[[], Awaitable[node_pb2.NodeMetrics | None]]


def overlay(base: node_pb2.NodeMetrics | None, top: node_pb2.NodeMetrics) -> node_pb2.NodeMetrics:
    """`base` with every field `top` sets replaced (a metrics file over a driver's)."""
    out = node_pb2.NodeMetrics()
    if base is not None:
        out.CopyFrom(base)
    for field, value in top.ListFields():
        if field.name != "health":
            setattr(out, field.name, value)
    if top.health != node_pb2.HEALTH_STATUS_UNSPECIFIED:
        out.health = top.health
    return out


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
        # The metrics problems of the last beat, each warned about once when it appeared.
        self._warned: set[tuple[str, str]] = set()

    async def metrics(self) -> node_pb2.NodeMetrics:
        """What this beat reports: the source's metrics (a driver's: the proxy's own
        statistics) with every field the metrics file sets laid over them, without the
        values the server would refuse; or nothing known. Never raises: a beat goes out
        whatever the metrics, since it is also the node's liveness."""
        problems: dict[tuple[str, str], str] = {}
        merged: node_pb2.NodeMetrics | None = None
        if self._metrics is not None:
            try:
                got = await self._metrics()
            except Exception as e:  # a source's bug
                problems[(_WHOLE, type(e).__name__)] = str(e) or repr(e)
            else:
                if got is not None:
                    reading = check_metrics(got)
                    merged = reading.metrics
                    problems.update({(d.field, d.problem): d.detail for d in reading.dropped})
        if self.metrics_file is not None:
            try:
                reading = read_metrics_file(self.metrics_file)
            except MetricsError as e:
                problems[(_WHOLE, e.problem)] = str(e)
            else:
                merged = overlay(merged, reading.metrics)
                problems.update({(d.field, d.problem): d.detail for d in reading.dropped})
        self._problems(problems)
        return merged if merged is not None else unknown_metrics()

    def _problems(self, current: dict[tuple[str, str], str]) -> None:
        """Warn about each problem in `current` the previous beat did not have, and say
        when one is gone: one line per problem while it lasts, not one per beat."""
        for key in current.keys() - self._warned:
            field, problem = key
            if field == _WHOLE:
                self._log.warning(
                    "heartbeat.metrics_unreadable",
                    error=current[key],
                    detail="sending no metrics (health unknown) until they can be read",
                )
            else:
                self._log.warning(
                    "heartbeat.metric_dropped",
                    field=field,
                    problem=problem,
                    error=current[key],
                    detail=f"{field} is left out of heartbeats (not reported) until it is valid",
                )
        for field, problem in sorted(self._warned - current.keys()):
            self._log.info("heartbeat.metrics_problem_cleared", field=field, problem=problem)
        self._warned = set(current)

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
