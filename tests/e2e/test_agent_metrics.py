"""A real agent whose metrics file holds one bad value keeps its liveness.

The server refuses a heartbeat with a metric outside its bounds, so before the agent
dropped bad fields a single NaN in the file had every beat refused and the node went
OFFLINE while it ran. Now the beat carries the valid metrics and leaves the bad one out.
"""

from __future__ import annotations

import math
from datetime import timedelta
from pathlib import Path

import pytest

from controlplane.api.node.v1 import node_pb2
from tests.e2e.conftest import AgentFactory
from tests.support.processes import ControlClient, ServerProcess
from tests.support.rollout_fleet import metrics_file_args

pytestmark = pytest.mark.e2e

OFFLINE_AFTER = 3.0
# What a proxy's exporter wrote, with a division by zero in the error rate.
METRICS = {
    "health": "healthy",
    "error_rate": math.nan,
    "p99_latency_ms": 30.0,
    "cpu_percent": 12.5,
    "memory_percent": 40.0,
    "requests_per_second": 250.0,
}
VALID = {k: v for k, v in METRICS.items() if k not in ("health", "error_rate")}


def reported(m: node_pb2.NodeMetrics) -> dict[str, float]:
    return {f.name: v for f, v in m.ListFields() if f.name != "health"}


@pytest.mark.both_backends
@pytest.mark.server_args("--offline-after", str(OFFLINE_AFTER))
async def test_a_nan_metric_is_left_out_and_the_node_stays_online(
    server: ServerProcess, control: ControlClient, spawn_agent: AgentFactory, tmp_path: Path
) -> None:
    path = tmp_path / "metrics.json"
    agent = spawn_agent("edge-nan", {"env": "prod"}, extra_args=metrics_file_args(path, METRICS))
    assert "NaN" in path.read_text()  # the file really holds the JSON NaN token
    node_id = await agent.wait_registered()

    node = await control.wait_node(
        node_id,
        lambda n: n.status == node_pb2.NODE_STATUS_ONLINE and n.HasField("last_heartbeat"),
        timeout=30,
        what="online with a heartbeat",
    )
    metrics = node.last_heartbeat.metrics
    assert metrics.health == node_pb2.HEALTH_STATUS_HEALTHY
    assert not metrics.HasField("error_rate")
    assert reported(metrics) == VALID

    # Beats keep being accepted for longer than the offline window, and the node with them.
    first = node.last_heartbeat.received_at.ToDatetime()
    later = first + timedelta(seconds=OFFLINE_AFTER + 1)
    node = await control.wait_node(
        node_id,
        lambda n: n.last_heartbeat.received_at.ToDatetime() >= later,
        timeout=30,
        what=f"a heartbeat {OFFLINE_AFTER + 1:.0f} s after the first",
    )
    assert node.status == node_pb2.NODE_STATUS_ONLINE
    history = await control.nodes.ListHeartbeats(
        node_pb2.ListHeartbeatsRequest(node_id=node_id), metadata=control.metadata, timeout=10
    )
    assert len(history.heartbeats) >= 2
    assert all(reported(h.metrics) == VALID for h in history.heartbeats)

    # No beat was refused, and the bad field was warned about once, not once per beat.
    log = agent.log()
    assert "heartbeat.failed" not in log
    dropped = [line for line in log.splitlines() if "heartbeat.metric_dropped" in line]
    assert len(dropped) == 1 and "field=error_rate" in dropped[0], dropped
