"""The agent's metrics: a bad value costs that field, never the heartbeat.

The server refuses a whole heartbeat over one metric out of its bounds, and a node whose
beats are refused goes OFFLINE. So the agent drops each invalid field, keeps the others,
warns once per problem, and checks with the server's own bounds — which this module
holds the agent's copy to (the agent may not import the domain; a test may).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent_stub.heartbeat import (
    METRIC_BOUNDS,
    Dropped,
    Heartbeater,
    MetricsError,
    check_metrics,
    parse_metrics,
    read_metrics_file,
)
from agent_stub.logs import EventLog
from controlplane.api.node.v1 import node_pb2
from controlplane.domain.fleet.nodes import METRIC_BOUNDS as SERVER_BOUNDS
from controlplane.domain.fleet.nodes import _check_metrics
from controlplane.domain.kernel.errors import InvalidArgument
from controlplane.domain.model.fleet import METRIC_NAMES, MetricName, NodeMetrics

VALID: dict[str, Any] = {
    "health": "healthy",
    "error_rate": 0.01,
    "p99_latency_ms": 30.0,
    "cpu_percent": 12.5,
    "memory_percent": 40.0,
    "requests_per_second": 250.0,
}
NUMBERS = {k: float(v) for k, v in VALID.items() if k != "health"}


def reported(m: node_pb2.NodeMetrics) -> dict[str, float]:
    return {f.name: v for f, v in m.ListFields() if f.name != "health"}


# -- one source of truth for the bounds -----------------------------------------------------


def test_the_agent_checks_with_the_servers_bounds() -> None:
    """The agent's copy is the server's table, for every metric the server stores."""
    assert METRIC_BOUNDS == SERVER_BOUNDS
    assert set(SERVER_BOUNDS) == set(METRIC_NAMES)


def _server_accepts(name: str, value: float) -> bool:
    try:
        _check_metrics(NodeMetrics(**{name: value}))  # type: ignore[arg-type]
    except InvalidArgument:
        return False
    return True


@pytest.mark.parametrize("name", METRIC_NAMES)
def test_the_agent_keeps_exactly_what_the_server_accepts(name: MetricName) -> None:
    """Equal tables are not enough if the comparison differs (inclusive ends, NaN, -0.0):
    at and around each bound, the agent keeps a value iff the server takes it."""
    low, high = SERVER_BOUNDS[name]
    probes = [
        low,
        high,
        math.nextafter(low, -math.inf),
        math.nextafter(high, math.inf),
        -0.0,
        (low + high) / 2,
        math.nan,
        math.inf,
        -math.inf,
        1e308,
    ]
    for value in probes:
        kept = parse_metrics({name: value}).metrics.HasField(name)
        assert kept == _server_accepts(name, value), f"{name}={value}: agent kept={kept}"
        sent = node_pb2.NodeMetrics()
        setattr(sent, name, value)
        from_source = check_metrics(sent).metrics.HasField(name)
        assert from_source == kept, f"{name}={value}: a source's value kept={from_source}"


@pytest.mark.parametrize("name", METRIC_NAMES)
@pytest.mark.parametrize("value", [math.nan, math.inf, -1.0, 1e12])
def test_the_servers_refusal_names_the_field(name: str, value: float) -> None:
    with pytest.raises(InvalidArgument) as refused:
        _check_metrics(NodeMetrics(**{name: value}))  # type: ignore[arg-type]
    assert refused.value.field == f"metrics.{name}"
    assert str(refused.value).startswith(f"metrics.{name}: ")


# -- parse_metrics: each bad field dropped, the rest kept -------------------------------


BAD_VALUES: list[tuple[str, Any, str]] = [
    ("error_rate", math.nan, "not finite"),
    ("error_rate", math.inf, "not finite"),
    ("error_rate", -math.inf, "not finite"),
    ("error_rate", 1.5, "out of range"),
    ("error_rate", -0.01, "out of range"),
    ("cpu_percent", 100.01, "out of range"),
    ("memory_percent", -5, "out of range"),
    ("p99_latency_ms", 3.6e6 + 1, "out of range"),
    ("requests_per_second", 1e300, "out of range"),
    ("requests_per_second", 10**400, "out of range"),  # past the largest float
    ("p99_latency_ms", "30", "not a number"),
    ("cpu_percent", True, "not a number"),
    ("memory_percent", [40], "not a number"),
    ("requests_per_second", {"value": 1}, "not a number"),
    ("health", "fine", "unknown health"),
    ("health", True, "unknown health"),
    ("health", 42, "unknown health"),
    ("health", 0.5, "unknown health"),
]


@pytest.mark.parametrize(("name", "value", "problem"), BAD_VALUES)
def test_a_bad_value_drops_its_field_and_keeps_the_others(name: str, value: Any, problem: str) -> None:
    m, dropped = parse_metrics({**VALID, name: value})
    assert [(d.field, d.problem) for d in dropped] == [(name, problem)]
    assert dropped[0].detail  # what the value was, for the warning
    if name == "health":
        assert m.health == node_pb2.HEALTH_STATUS_UNSPECIFIED
        assert reported(m) == NUMBERS
    else:
        assert not m.HasField(name)  # type: ignore[arg-type]
        assert m.health == node_pb2.HEALTH_STATUS_HEALTHY
        assert reported(m) == {k: v for k, v in NUMBERS.items() if k != name}


def test_every_field_bad_leaves_nothing_but_is_still_a_reading() -> None:
    m, dropped = parse_metrics({name: math.nan for name in METRIC_NAMES} | {"health": "?"})
    assert m.health == node_pb2.HEALTH_STATUS_UNSPECIFIED and reported(m) == {}
    assert {d.field for d in dropped} == {"health", *METRIC_NAMES}


def test_a_long_bad_value_is_shown_cut_short() -> None:
    [d] = parse_metrics({"error_rate": "x" * 10_000}).dropped
    assert len(d.detail) < 100 and d.detail.endswith("is not a number")


def test_a_file_with_nan_infinity_and_huge_numbers_keeps_its_good_fields(tmp_path: Path) -> None:
    """What a JSON file can hold that Python values cannot show: the NaN and Infinity
    tokens, 1e999 (inf as a float), and an integer past Python's 4300-digit limit for
    int() — which would otherwise fail the whole parse and cost every metric."""
    path = tmp_path / "metrics.json"
    path.write_text(
        '{"health": "degraded", "error_rate": NaN, "p99_latency_ms": Infinity, '
        '"cpu_percent": 1e999, "memory_percent": 55, "requests_per_second": ' + "9" * 5000 + "}"
    )
    m, dropped = read_metrics_file(path)
    assert m.health == node_pb2.HEALTH_STATUS_DEGRADED and reported(m) == {"memory_percent": 55.0}
    assert {d.field for d in dropped} == {
        "error_rate",
        "p99_latency_ms",
        "cpu_percent",
        "requests_per_second",
    }
    path.write_text('{"requests_per_second": 123456789012345678901234567890123456789, "cpu_percent": 7}')
    m, dropped = read_metrics_file(path)
    assert reported(m) == {"cpu_percent": 7.0} and [d.field for d in dropped] == ["requests_per_second"]


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"[1, 2]", b'"healthy"', b"\xff\xfe{}", b"[" * 100_000 + b"]" * 100_000, b""],
    ids=["not-json", "array", "string", "not-utf8", "nested-deep", "empty"],
)
def test_a_file_that_is_no_json_object_is_a_metrics_error(tmp_path: Path, content: bytes) -> None:
    """Never another exception: one escaping would skip the beat, and the node's liveness."""
    path = tmp_path / "metrics.json"
    path.write_bytes(content)
    with pytest.raises(MetricsError) as e:
        read_metrics_file(path)
    assert e.value.problem
    with pytest.raises(MetricsError, match="No such file"):
        read_metrics_file(tmp_path / "missing.json")


def test_a_sources_bad_value_is_dropped_too() -> None:
    m, dropped = check_metrics(
        node_pb2.NodeMetrics(health=node_pb2.HEALTH_STATUS_HEALTHY, error_rate=2.0, cpu_percent=math.nan)
    )
    assert m.health == node_pb2.HEALTH_STATUS_HEALTHY and reported(m) == {}
    assert dropped == [
        Dropped("error_rate", "out of range", "2.0 is outside [0.0, 1.0]"),
        Dropped("cpu_percent", "not finite", "nan is outside [0.0, 100.0]"),
    ]


# -- the Heartbeater: one warning per problem, not per beat -----------------------------


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, object]]] = []

    def __call__(self, event: str, fields: Mapping[str, object]) -> None:
        if event.startswith("heartbeat."):
            self.events.append((event, dict(fields)))

    def take(self) -> list[tuple[str, str]]:
        """(event, field or error) since the last take."""
        taken = [(e, str(f.get("field") or f.get("error"))) for e, f in self.events]
        self.events.clear()
        return taken


@pytest.fixture
async def channel() -> AsyncIterator[Any]:
    # Never dialled: these tests read metrics, they do not send beats.
    ch = grpc.aio.insecure_channel("127.0.0.1:9")
    yield ch
    await ch.close()


def heartbeater(channel: Any, recorder: Recorder, **kwargs: Any) -> Heartbeater:
    log = EventLog(logging.getLogger("test.heartbeat"), listeners=[recorder])
    return Heartbeater(channel, lambda: "n-1", lambda: (), lambda: "", log, **kwargs)


async def test_a_bad_field_is_warned_once_while_it_lasts(channel: Any, tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    recorder = Recorder()
    beats = heartbeater(channel, recorder, metrics_file=path)

    def write(**fields: Any) -> None:
        path.write_text(json.dumps({**VALID, **fields}))

    write(error_rate=math.nan)
    for _ in range(5):
        m = await beats.metrics()
        assert not m.HasField("error_rate") and reported(m) == {
            k: v for k, v in NUMBERS.items() if k != "error_rate"
        }
    assert recorder.take() == [("heartbeat.metric_dropped", "error_rate")]
    # Another NaN-like value is the same problem; another kind of fault is a new one.
    write(error_rate=math.inf)
    await beats.metrics()
    assert recorder.take() == []
    write(error_rate=7.0, cpu_percent="high")
    await beats.metrics()
    await beats.metrics()
    assert sorted(recorder.take()) == [
        ("heartbeat.metric_dropped", "cpu_percent"),
        ("heartbeat.metric_dropped", "error_rate"),
        ("heartbeat.metrics_problem_cleared", "error_rate"),
    ]
    # Fixed: said once; broken again later: warned again.
    write()
    assert reported(await beats.metrics()) == NUMBERS
    await beats.metrics()
    assert sorted(recorder.take()) == [
        ("heartbeat.metrics_problem_cleared", "cpu_percent"),
        ("heartbeat.metrics_problem_cleared", "error_rate"),
    ]
    write(error_rate=-1)
    await beats.metrics()
    assert recorder.take() == [("heartbeat.metric_dropped", "error_rate")]


async def test_an_unreadable_file_sends_nothing_known_and_is_warned_once(
    channel: Any, tmp_path: Path
) -> None:
    path = tmp_path / "metrics.json"
    recorder = Recorder()
    beats = heartbeater(channel, recorder, metrics_file=path)
    for _ in range(3):
        m = await beats.metrics()
        assert m.health == node_pb2.HEALTH_STATUS_UNSPECIFIED and reported(m) == {}
    [(event, error)] = recorder.take()
    assert event == "heartbeat.metrics_unreadable" and "No such file" in error
    path.write_text("{half a fi")
    await beats.metrics()
    await beats.metrics()
    [(event, error)] = [e for e in recorder.take() if e[0] == "heartbeat.metrics_unreadable"]
    assert "cannot read" in error
    path.write_text(json.dumps(VALID))
    assert reported(await beats.metrics()) == NUMBERS
    assert [e for e, _ in recorder.take()] == ["heartbeat.metrics_problem_cleared"]


async def test_a_metrics_source_that_fails_or_lies_costs_no_beat(channel: Any) -> None:
    recorder = Recorder()
    answers: list[Any] = [
        RuntimeError("exporter down"),
        RuntimeError("exporter down"),
        node_pb2.NodeMetrics(health=node_pb2.HEALTH_STATUS_HEALTHY, error_rate=math.nan, cpu_percent=3.0),
    ]

    async def source() -> node_pb2.NodeMetrics:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        assert isinstance(answer, node_pb2.NodeMetrics)
        return answer

    beats = heartbeater(channel, recorder, metrics=source)
    for _ in range(2):
        m = await beats.metrics()
        assert m.health == node_pb2.HEALTH_STATUS_UNSPECIFIED and reported(m) == {}
    assert recorder.take() == [("heartbeat.metrics_unreadable", "exporter down")]
    m = await beats.metrics()
    assert m.health == node_pb2.HEALTH_STATUS_HEALTHY and reported(m) == {"cpu_percent": 3.0}
    assert sorted(recorder.take()) == [
        ("heartbeat.metric_dropped", "error_rate"),
        ("heartbeat.metrics_problem_cleared", "metrics"),
    ]
