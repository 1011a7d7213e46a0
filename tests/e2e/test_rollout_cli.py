"""The `controlplane rollout` commands as an operator runs them: real subprocesses of the
CLI against a real server process, with real agents applying what the rollouts write.
Each command's output is checked, and so is its effect — on the rollout (over gRPC) and
on the agents' disks."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from controlplane.api.identity.v1 import identity_pb2, identity_pb2_grpc
from controlplane.cli.servers import EXIT_FAILED
from tests.e2e.conftest import AgentFactory
from tests.support.eventually import eventually
from tests.support.processes import AgentProcess, ControlClient, ServerProcess
from tests.support.rollout_fleet import SERVER_ARGS, Rollouts, archive, metrics_file_args, pb, seconds

pytestmark = pytest.mark.e2e


async def cli(server: ServerProcess, key: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`controlplane rollout ARGS --server ...` as operator `key`."""
    env = {**os.environ, "CONTROLPLANE_API_KEY": key, "GRPC_VERBOSITY": "ERROR"}
    command = [sys.executable, "-m", "controlplane", "rollout", *args, "--server", server.address]
    return await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, timeout=90, env=env
    )


async def ok(server: ServerProcess, key: str, *args: str) -> str:
    done = await cli(server, key, *args)
    assert done.returncode == 0, f"{args}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


async def on(agents: list[AgentProcess], digest: str) -> None:
    for agent in agents:
        await agent.wait_current(digest)


@pytest.mark.server_args(*SERVER_ARGS)
async def test_rollout_commands_show_and_act_on_rollouts(
    server: ServerProcess, control: ControlClient, spawn_agent: AgentFactory, tmp_path: Path
) -> None:
    # Gated rollouts (a healthy heartbeat, the default) need agents that report health.
    agents = [
        spawn_agent(f"edge-{i}", {"env": "prod"}, extra_args=metrics_file_args(tmp_path / f"m{i}.json"))
        for i in range(2)
    ]
    for agent in agents:
        await agent.wait_registered()
    admin = server.admin_key
    identity = identity_pb2_grpc.IdentityServiceStub(control.channel)

    async def operator(name: str) -> str:
        made = await identity.CreateApiKey(
            identity_pb2.CreateApiKeyRequest(
                name=name, grants=[identity_pb2.Grant(project="default", role=identity_pb2.ROLE_OPERATOR)]
            ),
            metadata=control.metadata,
        )
        return str(made.secret)

    # Siblings, both minted by the admin key: neither minted the other, so one may approve
    # what the other created (the admin key, their minter, may not).
    bob, carol = await operator("bob"), await operator("carol")
    rollouts = Rollouts(control.channel, metadata=control.metadata)
    v1, v2, v3 = [await control.upload(archive(tag)) for tag in ("v1", "v2", "v3")]
    first = await rollouts.create(v1, strategy=pb.STRATEGY_ALL_AT_ONCE)
    assert (await rollouts.watch(first.id)).last_state == pb.ROLLOUT_STATE_SUCCEEDED
    await on(agents, v1)

    # approve: not by its creator; by another operator it starts.
    gated = await Rollouts(control.channel, metadata=(("authorization", f"Bearer {carol}"),)).create(
        v2, approvals_required=1, rolling=pb.RollingParams(batch_size=1), bake_time=seconds(2)
    )
    refused = await cli(server, carol, "approve", gated.id, "--reason", "mine")
    assert refused.returncode != 0 and "PERMISSION_DENIED" in refused.stderr, refused.stderr
    out = await ok(server, bob, "approve", gated.id, "--reason", "lgtm")
    assert out.startswith(f"rollout {gated.id}: ") and "pending_approval" not in out, out
    approved = await rollouts.get(gated.id)
    assert [a.comment for a in approved.approvals] == ["lgtm"]
    assert approved.approvals[0].actor != approved.created_by

    # pause, then get and list show it paused and nothing advances.
    await rollouts.wait_state(gated.id, pb.ROLLOUT_STATE_RUNNING)
    out = await ok(server, admin, "pause", gated.id, "--reason", "checking graphs")
    assert out.strip() == f"rollout {gated.id}: paused (checking graphs)"
    held = [(s.state, s.revision) for s in (await rollouts.get(gated.id)).steps]
    shown = json.loads(await ok(server, admin, "get", gated.id, "-o", "json"))["rollout"]
    assert shown["id"] == gated.id and shown["state"] == "ROLLOUT_STATE_PAUSED"
    assert shown["reason"] == "checking graphs" and len(shown["steps"]) == 2
    listed = await ok(server, admin, "list")
    assert listed.splitlines()[0].split()[:3] == ["ID", "STATE", "STRATEGY"], listed  # headers
    line = next(x for x in listed.splitlines() if x.startswith(gated.id))
    assert "paused" in line and "checking graphs" in line
    assert first.id in listed and "succeeded" in listed
    # Seconds of CLI calls later, no step has moved.
    assert [(s.state, s.revision) for s in (await rollouts.get(gated.id)).steps] == held

    # resume, then watch follows it live to the end (exit 0 on success).
    out = await ok(server, admin, "resume", gated.id)
    assert out.strip() == f"rollout {gated.id}: running"
    watched = await ok(server, admin, "watch", gated.id)
    lines = watched.splitlines()
    assert lines[0].startswith(f"rollout {gated.id}: env=prod -> {v2}")
    assert any("step 1 done" in x for x in lines) and "[succeeded]" in lines[-1], watched
    await on(agents, v2)

    # rollback: every node the rollout wrote goes back.
    bad = await rollouts.create(v3, strategy=pb.STRATEGY_ALL_AT_ONCE, bake_time=seconds(60))
    await on(agents, v3)
    out = await ok(server, admin, "rollback", bad.id, "--reason", "bad deploy")
    assert out.strip() == f"rollout {bad.id}: rolled_back (bad deploy)"
    await on(agents, v2)

    # cancel: the node on the bundle keeps it, the rollout's other nodes stay where they were.
    slow = await rollouts.create(v3, rolling=pb.RollingParams(batch_size=1), bake_time=seconds(60))
    first_node = min(agents, key=lambda a: a.node_id)
    other = max(agents, key=lambda a: a.node_id)
    await first_node.wait_current(v3)
    out = await ok(server, admin, "cancel", slow.id, "--reason", "enough")
    assert out.strip() == f"rollout {slow.id}: cancelled (enough)"

    async def settled() -> None:
        assert (first_node.current_digest(), other.current_digest()) == (v3, v2)

    await eventually(settled, timeout=10, what="cancel left each node where it was")
    # Watching a rollout that ended prints it and exits 3: cancelled, it did not succeed.
    ended = await cli(server, admin, "watch", slow.id)
    assert ended.returncode == EXIT_FAILED and "[cancelled]" in ended.stdout.splitlines()[-1], ended.stdout
    missing = await cli(server, admin, "get", "r-missing")
    assert missing.returncode != 0 and "NOT_FOUND" in missing.stderr and "rollout_id" in missing.stderr
