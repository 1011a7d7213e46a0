"""With the control plane down the node keeps its bundle, even across an agent restart."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import AgentFactory
from tests.support.archives import bundle
from tests.support.processes import ControlClient, ServerProcess, wait_until

pytestmark = pytest.mark.e2e

FILES = {"main.kdl": b"listen 8080\n", "conf/upstreams.kdl": b"upstream a\n"}


async def test_agent_restarted_while_server_is_down_keeps_serving_and_converges_later(
    server: ServerProcess, control: ControlClient, spawn_agent: AgentFactory
) -> None:
    agent = spawn_agent("edge-1", {"env": "prod"})
    v1 = await control.upload(bundle(FILES))
    await control.assign(v1, selector="env=prod")
    await agent.wait_current(v1)
    await agent.wait_log(r"report\.sent .*phase=ACTIVE")
    cursor = agent.cursor()

    await server.kill()
    assert await agent.stop() == 0
    agent.start()
    hexdigest = v1.removeprefix("sha256:")
    await agent.wait_log(rf"agent\.start .*current=sha256:{hexdigest}")

    # It keeps trying (probing the server it cannot reach: docs/agent.md), and keeps the
    # bundle in place meanwhile.
    async def retried() -> None:
        assert agent.log_since_start().count("reconnect.wait") >= 3, "fewer than three retries"

    await wait_until(retried, 15, "three retries")
    assert agent.current_digest() == v1
    assert agent.current_files() == FILES
    assert agent.cursor()["revision"] == cursor["revision"]
    assert agent.cursor()["applied_digest"] == v1
    assert agent.running

    await server.start()
    await agent.wait_log(r"stream\.started .*mode=RESUME")
    v2 = await control.upload(bundle({**FILES, "main.kdl": b"listen 9090\n"}))
    await control.assign(v2, selector="env=prod")
    await agent.wait_current(v2)
    assert agent.current_files()["main.kdl"] == b"listen 9090\n"
    await control.wait_node(agent.node_id, lambda n: n.applied_digest == v2, what="applied v2")
