"""Several real agent processes converge on selector assignments."""

from __future__ import annotations

import pytest

from controlplane.api.node.v1 import node_pb2
from tests.e2e.conftest import AgentFactory
from tests.support.archives import bundle
from tests.support.processes import ControlClient, ServerProcess

pytestmark = pytest.mark.e2e

FILES_V1 = {"main.kdl": b"listen 8080\n", "conf/routes.kdl": b'route "/" backend="backend-a"\n'}
FILES_V2 = {
    "main.kdl": b"listen 8080\n",
    "conf/routes.kdl": b'route "/" backend="backend-b"\n',
    "certs/site.pem": b"PEM",
}


@pytest.mark.both_backends
async def test_five_agents_converge_on_each_assignment(
    server: ServerProcess, control: ControlClient, spawn_agent: AgentFactory
) -> None:
    fleet = [spawn_agent(f"edge-{i}", {"env": "prod", "zone": f"z{i % 2}"}) for i in range(5)]
    bystander = spawn_agent("stage-1", {"env": "staging"})

    v1 = await control.upload(bundle(FILES_V1), version="v1")
    await control.assign(v1, selector="env=prod")
    for agent in fleet:
        await agent.wait_current(v1)
        assert agent.current_files() == FILES_V1
    for agent in fleet:
        node = await control.wait_node(
            agent.node_id,
            lambda n: n.applied_digest == v1 and n.last_report.phase == node_pb2.REPORT_PHASE_ACTIVE,
            what=f"{agent.name} ACTIVE on v1",
        )
        assert node.name == agent.name
        assert node.agent_version.startswith("agent-stub/")

    v2 = await control.upload(bundle(FILES_V2), version="v2")
    revision = await control.assign(v2, selector="env=prod")
    for agent in fleet:
        await agent.wait_current(v2)
        assert agent.current_files() == FILES_V2
        # The previous bundle stays on disk for a quick rollback; nothing else does.
        assert agent.bundle_dirs() == sorted(d.removeprefix("sha256:") for d in (v1, v2))
    for agent in fleet:
        node = await control.wait_node(
            agent.node_id,
            lambda n: n.applied_digest == v2 and n.last_heartbeat.applied_digest == v2,
            what=f"{agent.name} ACTIVE on v2 and heartbeating it",
        )
        assert node.applied_revision >= revision
        assert node.status == node_pb2.NODE_STATUS_ONLINE
        cursor = agent.cursor()
        assert cursor["applied_digest"] == v2
        assert cursor["revision"] >= revision

    # Outside the selector: registered, watching, but nothing to run.
    assert bystander.current_digest() == ""
    assert (await control.get_node(bystander.node_id)).applied_digest == ""

    for agent in (*fleet, bystander):
        assert await agent.stop() == 0, f"{agent.name} did not exit cleanly:\n{agent.log()[-2000:]}"
        assert "agent.stop" in agent.log_since_start()
