"""Rollouts against real agent processes: a canary made bad on purpose (its apply command
writes the metrics the agent reports), a NACK from a real apply command, and the CLI's
`rollout create --watch` following it live."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from controlplane.api.node.v1 import node_pb2
from tests.e2e.conftest import AgentFactory
from tests.support.archives import bundle
from tests.support.eventually import eventually
from tests.support.processes import AgentProcess, ControlClient, ServerProcess
from tests.support.rollout_fleet import SERVER_ARGS, Rollouts, archive, metrics_file_args, pb, seconds

pytestmark = pytest.mark.e2e

# The proxy's reload: report errors when the new bundle carries a bad.flag, refuse it
# outright when it carries reject.flag.
APPLY = (
    'if [ -f "$BUNDLE_DIR/reject.flag" ]; then echo "config test failed" >&2; exit 3; fi; '
    'if [ -f "$BUNDLE_DIR/bad.flag" ]; then rate=0.4; else rate=0.001; fi; '
    'echo "{\\"health\\": \\"healthy\\", \\"error_rate\\": $rate, \\"p99_latency_ms\\": 30}" > "$METRICS"'
)


def spawn(spawn_agent: AgentFactory, tmp_path: Path, name: str) -> AgentProcess:
    metrics = tmp_path / f"{name}-metrics.json"
    return spawn_agent(
        name,
        {"env": "prod"},
        apply_command=f'METRICS="{metrics}"; {APPLY}',
        extra_args=metrics_file_args(metrics),
    )


def flagged(tag: str, flag: str) -> bytes:
    return bundle(
        {"main.kdl": b"listen 8080\n", "routes.kdl": f'route "/" upstream="{tag}"\n'.encode(), flag: b"1"}
    )


@pytest.mark.server_args(*SERVER_ARGS)
async def test_real_agents_canary_rolls_back_on_bad_metrics_and_nack(
    server: ServerProcess, control: ControlClient, spawn_agent: AgentFactory, tmp_path: Path
) -> None:
    agents = [spawn(spawn_agent, tmp_path, f"edge-{i}") for i in range(5)]
    for agent in agents:
        await agent.wait_registered()
    rollouts = Rollouts(control.channel, metadata=control.metadata)
    v1 = await control.upload(archive("v1"))
    first = await rollouts.create(v1, strategy=pb.STRATEGY_ALL_AT_ONCE)
    assert (await rollouts.watch(first.id)).last_state == pb.ROLLOUT_STATE_SUCCEEDED

    worse = await control.upload(flagged("v2", "bad.flag"))
    canary = await rollouts.create(
        worse,
        strategy=pb.STRATEGY_CANARY,
        canary=pb.CanaryParams(steps_percent=[20, 60, 100], analysis=pb.CanaryAnalysis(min_sample=2)),
        gates=pb.HealthGates(),
        bake_time=seconds(2),
    )
    assert (await rollouts.watch(canary.id, timeout=60)).last_state == pb.ROLLOUT_STATE_ROLLED_BACK
    done = await rollouts.get(canary.id)
    assert "canary analysis" in done.reason and done.steps[0].analyses[-1].canary_error_rate > 0.3
    for agent in agents:
        await agent.wait_current(v1)

    refused = await control.upload(flagged("v3", "reject.flag"))
    nacked = await rollouts.create(refused, rolling=pb.RollingParams(batch_size=2))
    assert (await rollouts.watch(nacked.id, timeout=60)).last_state == pb.ROLLOUT_STATE_ROLLED_BACK
    reason = (await rollouts.get(nacked.id)).reason
    assert "rejected the bundle" in reason and "exited with code 3" in reason
    for agent in agents:
        await agent.wait_current(v1)


@pytest.mark.server_args(*SERVER_ARGS)
async def test_cli_creates_and_watches_a_rollout_to_real_agents(
    server: ServerProcess, control: ControlClient, spawn_agent: AgentFactory, tmp_path: Path
) -> None:
    agents = [
        spawn_agent(f"edge-{i}", {"env": "prod"}, extra_args=metrics_file_args(tmp_path / f"m{i}.json"))
        for i in range(3)
    ]
    for agent in agents:
        await agent.wait_registered()
    v1 = await control.upload(archive("v1"))
    args = [
        sys.executable,
        "-m",
        "controlplane",
        "rollout",
        "create",
        v1,
        "--server",
        server.address,
        "--selector",
        "env=prod",
        "--strategy",
        "rolling",
        "--batch-size",
        "1",
        "--bake",
        "0s",
        "--watch",
    ]
    env = {"CONTROLPLANE_API_KEY": server.admin_key, "GRPC_VERBOSITY": "ERROR", "PATH": "/usr/bin:/bin"}
    done = await asyncio.to_thread(subprocess.run, args, capture_output=True, text=True, timeout=60, env=env)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "step 0 started (deploy): 1 node(s)" in out and "step 2 done" in out
    assert "[succeeded]" in out.splitlines()[-1]
    for agent in agents:
        await agent.wait_current(v1)
    listed = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "controlplane", "rollout", "list", "--server", server.address],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=True,
    )
    assert "succeeded" in listed.stdout


@pytest.mark.both_backends
@pytest.mark.server_args(*SERVER_ARGS)
async def test_a_real_agent_without_a_metrics_file_reports_nothing_and_fails_the_gates(
    server: ServerProcess, control: ControlClient, spawn_agent: AgentFactory, tmp_path: Path
) -> None:
    """An agent with no metrics file does not claim to be healthy: its heartbeats carry
    health UNSPECIFIED and no metric, GetNode shows them absent, and a gated rollout
    fails naming what is missing — while a node with a metrics file passes the same gates."""
    silent = spawn_agent("edge-silent", {"env": "prod"})
    fine = spawn_agent("edge-fine", {"env": "prod"}, extra_args=metrics_file_args(tmp_path / "m.json"))
    node_id = await silent.wait_registered()
    await fine.wait_registered()

    async def beating() -> node_pb2.Node:
        node = (
            await control.nodes.GetNode(node_pb2.GetNodeRequest(node_id=node_id), metadata=control.metadata)
        ).node
        assert node.HasField("last_heartbeat"), "no heartbeat yet"
        return node

    node = await eventually(beating, timeout=30, what="a heartbeat from the agent")
    metrics = node.last_heartbeat.metrics
    assert metrics.health == node_pb2.HEALTH_STATUS_UNSPECIFIED
    assert [f.name for f, _ in metrics.ListFields()] == []

    rollouts = Rollouts(control.channel, metadata=control.metadata)
    v1 = await control.upload(archive("v1"))
    gated = await rollouts.create(
        v1,
        strategy=pb.STRATEGY_ALL_AT_ONCE,
        gates=pb.HealthGates(require_healthy=False, max_error_rate=0.05),
        bake_time=seconds(30),
        gate_failure_window=seconds(2),
    )
    assert (await rollouts.watch(gated.id, timeout=60)).last_state == pb.ROLLOUT_STATE_ROLLED_BACK
    reason = (await rollouts.get(gated.id)).reason
    assert f"{node_id}: no error_rate reported" in reason and fine.node_id not in reason, reason
