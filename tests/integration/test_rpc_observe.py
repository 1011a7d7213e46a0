"""What the interceptor records of every call: go-grpc-prometheus counters and latency
by service, method and code; and log lines written during a call carry its request id,
project and node (the access log at DEBUG shows it)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import grpc
import pytest
from prometheus_client import REGISTRY

from controlplane.api.node.v1 import node_pb2
from controlplane.domain.kernel import observe
from controlplane.telemetry import logs
from tests.support.harness import Harness

NODES = "controlplane.node.v1.NodeService"


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
def access_log() -> Iterator[io.StringIO]:
    out = io.StringIO()
    handler = logs.setup(
        log_format="json", level="DEBUG", process="test/1", context=(observe.ids,), stream=out
    )
    yield out
    root = logging.getLogger()
    root.removeHandler(handler)
    root.setLevel(logging.WARNING)


async def test_calls_are_counted_and_timed_by_method_and_code(harness: Harness) -> None:
    ok = {"grpc_type": "unary", "grpc_service": NODES, "grpc_method": "ListNodes"}
    handled_before = _sample("grpc_server_handled_total", **ok, grpc_code="OK")
    timed_before = _sample("grpc_server_handling_seconds_count", **ok)
    refused_before = _sample("grpc_server_handled_total", **ok, grpc_code="UNAUTHENTICATED")
    await harness.nodes.ListNodes(node_pb2.ListNodesRequest(project="default"))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await harness.nodes.ListNodes(
            node_pb2.ListNodesRequest(project="default"), metadata=(("authorization", "Bearer cpk_nope"),)
        )
    assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert _sample("grpc_server_handled_total", **ok, grpc_code="OK") - handled_before == 1
    assert _sample("grpc_server_handled_total", **ok, grpc_code="UNAUTHENTICATED") - refused_before == 1
    assert _sample("grpc_server_handling_seconds_count", **ok) - timed_before == 2
    assert _sample("grpc_server_started_total", **ok) >= 2


async def test_a_calls_log_lines_carry_its_ids(harness: Harness, access_log: io.StringIO) -> None:
    node = await harness.register("edge-1", {"env": "prod"})
    await harness.nodes.ListNodes(
        node_pb2.ListNodesRequest(project="default"), metadata=(("x-request-id", "req-abc-1"),)
    )
    await harness.nodes.Heartbeat(node_pb2.HeartbeatRequest(node_id=node.node_id), metadata=node.metadata)
    lines = [json.loads(line) for line in access_log.getvalue().splitlines()]
    done = [line for line in lines if line["event"] == "rpc.done"]
    (listed,) = [line for line in done if line["method"] == f"{NODES}/ListNodes"]
    assert (listed["request_id"], listed["project"], listed["code"]) == ("req-abc-1", "default", "OK")
    assert listed["process"] == "test/1" and listed["ms"] >= 0
    (beat,) = [line for line in done if line["method"] == f"{NODES}/Heartbeat"]
    assert (beat["node_id"], beat["project"]) == (node.node_id, "default")
    assert beat["request_id"] != "req-abc-1" and len(beat["request_id"]) == 32
