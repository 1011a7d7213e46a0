"""`controlplane simulate` as a process against a real server process: a fleet that
registers, converges with random NACKs within the budget, makes a canary bad on purpose
through its metrics knobs, and prints a running summary."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO

import pytest

from controlplane.api.node.v1 import node_pb2
from tests.support.eventually import eventually
from tests.support.processes import ControlClient, ServerProcess
from tests.support.rollout_fleet import Rollouts, archive, pb, seconds

pytestmark = pytest.mark.e2e


def _spawn(args: list[str], log: IO[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)


@pytest.mark.server_args("--rollout-tick", "0.1", "--offline-after", "3")
async def test_simulated_fleet_process_converges_and_fails_a_bad_canary(
    server: ServerProcess, control: ControlClient, tmp_path: Path
) -> None:
    good = await control.upload(archive("v1"))
    worse = await control.upload(archive("v2"))
    out = tmp_path / "simulate.log"
    args = [
        sys.executable,
        "-m",
        "controlplane",
        "simulate",
        "--server",
        server.address,
        "--token-file",
        str(server.data_dir / "enrollment-token"),
        "--nodes",
        "20",
        "--labels",
        "env=prod",
        "--failure-rate",
        "0.05",
        "--apply-delay",
        "200ms",
        "--heartbeat-interval",
        "1",
        "--summary-every",
        "1s",
        "--seed",
        "3",
        "--bundle-metrics",
        f"{worse}:error_rate=0.4",
    ]
    with out.open("w") as log:
        proc = _spawn(args, log)
    try:

        async def registered() -> None:
            reply = await control.nodes.ListNodes(
                node_pb2.ListNodesRequest(project="default", status=node_pb2.NODE_STATUS_ONLINE),
                metadata=control.metadata,
            )
            assert len(reply.nodes) == 20, f"{len(reply.nodes)} online"

        await eventually(registered, timeout=30, what="20 simulated nodes online")
        rollouts = Rollouts(control.channel, metadata=control.metadata)
        rolling = await rollouts.create(good, rolling=pb.RollingParams(batch_percent=25), max_failures=5)
        assert (await rollouts.watch(rolling.id, timeout=60)).last_state == pb.ROLLOUT_STATE_SUCCEEDED
        counts = dict((await rollouts.get(rolling.id)).progress.nodes)
        assert counts.get("active", 0) + counts.get("failed", 0) == 20 and counts.get("active", 0) >= 15

        canary = await rollouts.create(
            worse,
            strategy=pb.STRATEGY_CANARY,
            canary=pb.CanaryParams(steps_percent=[10, 50, 100], analysis=pb.CanaryAnalysis(min_sample=2)),
            gates=pb.HealthGates(),
            bake_time=seconds(2),
            max_failures=5,
        )
        assert (await rollouts.watch(canary.id, timeout=60)).last_state == pb.ROLLOUT_STATE_ROLLED_BACK
        assert "error rate" in (await rollouts.get(canary.id)).reason
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, 30)
    text = out.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "simulating 20 node(s)" in text
    assert "nodes 20 running 20 connected 20" in text
    assert good.removeprefix("sha256:")[:12] in text.splitlines()[-1]
