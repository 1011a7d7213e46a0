"""Approvals on every path and late joiners, as an operator meets them: real `controlplane`
subprocesses against a real server process, with real agent processes applying what is
written. In a project that requires an approval, `assign` and `rollout pin` of a bundle a
node does not run are refused ("use a rollout"); holding a node on what it runs,
unassigning and an admin's audited break glass are not. A rollout created and watched
from the CLI leaves its bundle on its selector, so an agent started afterwards gets it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from controlplane.api.audit.v1 import audit_pb2, audit_pb2_grpc
from controlplane.api.identity.v1 import identity_pb2, identity_pb2_grpc
from tests.e2e.conftest import AgentFactory
from tests.support.processes import ControlClient, ServerProcess
from tests.support.rollout_fleet import SERVER_ARGS, archive, metrics_file_args

pytestmark = pytest.mark.e2e


async def run(server: ServerProcess, key: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CONTROLPLANE_API_KEY": key, "GRPC_VERBOSITY": "ERROR"}
    command = [sys.executable, "-m", "controlplane", *args, "--server", server.address]
    return await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, timeout=90, env=env
    )


async def ok(server: ServerProcess, key: str, *args: str) -> str:
    done = await run(server, key, *args)
    assert done.returncode == 0, f"{args}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


async def refused(server: ServerProcess, key: str, status: str, *args: str) -> str:
    done = await run(server, key, *args)
    assert done.returncode != 0 and status in done.stderr, f"{args}: {done.stdout}\n{done.stderr}"
    return done.stderr


@pytest.mark.server_args(*SERVER_ARGS)
async def test_direct_paths_need_approvals_and_a_late_agent_joins_the_rollouts_bundle(
    server: ServerProcess, control: ControlClient, spawn_agent: AgentFactory, tmp_path: Path
) -> None:
    first = spawn_agent("edge-0", {"env": "prod"}, extra_args=metrics_file_args(tmp_path / "m0.json"))
    node = await first.wait_registered()
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

    # Siblings minted by the admin key: one may approve what the other creates.
    bob, carol = await operator("bob"), await operator("carol")
    v1, v2, v3 = [await control.upload(archive(tag)) for tag in ("v1", "v2", "v3")]
    await ok(server, admin, "assign", "--selector", "env=prod", v1)
    await first.wait_current(v1)
    await ok(server, admin, "projects", "policy", "set", "--project", "default", "--min-approvals", "1")

    # A bundle the node does not run: refused, on every direct path, naming the way out.
    details = await refused(server, bob, "FAILED_PRECONDITION", "assign", "--node", node, v2)
    assert "use a rollout" in details and "break_glass_reason" in details, details
    await refused(server, bob, "FAILED_PRECONDITION", "assign", "--selector", "env=prod", v2)
    await refused(server, bob, "FAILED_PRECONDITION", "rollout", "pin", node, v2, "--reason", "x")
    # Holding the node on what it runs, and unassigning, stay free.
    await ok(server, bob, "assign", "--node", node, v1)
    await ok(server, bob, "unassign", "--node", node)
    await ok(server, bob, "rollout", "pin", node, v1, "--reason", "hold")
    await ok(server, bob, "rollout", "unpin", node)
    # Break glass: not for an operator; an admin may, and the audit log says so.
    denied = await refused(
        server, bob, "PERMISSION_DENIED", "assign", "--node", node, v2, "--break-glass", "outage"
    )
    assert "admin" in denied, denied
    await ok(server, admin, "assign", "--node", node, v2, "--break-glass", "incident 42: hotfix")
    await first.wait_current(v2)
    audit = audit_pb2_grpc.AuditServiceStub(control.channel)
    listed = await audit.ListAuditEvents(
        audit_pb2.ListAuditEventsRequest(page_size=1000), metadata=control.metadata
    )
    glass = [e for e in listed.events if e.action == "desired.break_glass"]
    assert len(glass) == 1 and glass[0].after["reason"] == "incident 42: hotfix", glass

    # A rollout is the way: carol creates it, bob approves it.
    await ok(server, admin, "unassign", "--node", node)
    out = await ok(
        server,
        carol,
        *("rollout", "create", v3, "--selector", "env=prod", "--strategy", "all-at-once", "--bake", "0s"),
    )
    rollout_id = out.split(":")[0].removeprefix("rollout ")
    assert "pending_approval" in out, out
    await ok(server, bob, "rollout", "approve", rollout_id, "--reason", "lgtm")
    watched = await ok(server, admin, "rollout", "watch", rollout_id)
    assert "baseline written" in watched and "[succeeded]" in watched.splitlines()[-1], watched
    # Watched after its end, a rollout still tells its story, each event once.
    again = await ok(server, admin, "rollout", "watch", rollout_id)
    assert again.count("baseline written") == 1 and "[succeeded]" in again.splitlines()[-1], again
    await first.wait_current(v3)
    # An agent started now, with the selector's labels, installs the rollout's bundle.
    late = spawn_agent("edge-late", {"env": "prod"}, extra_args=metrics_file_args(tmp_path / "m1.json"))
    await late.wait_registered()
    await late.wait_current(v3)
