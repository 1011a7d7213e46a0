"""The server dies under the agents and comes back: they resume, not bootstrap."""

from __future__ import annotations

import re

import pytest

from tests.e2e.conftest import AgentFactory
from tests.support.archives import bundle
from tests.support.processes import ControlClient, ServerProcess

pytestmark = pytest.mark.e2e


@pytest.mark.both_backends
async def test_agents_resume_after_server_sigkill_and_converge(
    server: ServerProcess, control: ControlClient, spawn_agent: AgentFactory
) -> None:
    fleet = [spawn_agent(f"edge-{i}", {"env": "prod"}) for i in range(3)]
    v1 = await control.upload(bundle({"main.kdl": b"v1"}))
    await control.assign(v1, selector="env=prod")
    for agent in fleet:
        await agent.wait_current(v1)
    # Every agent is past its first bookmark, so its cursor is the server's head.
    for agent in fleet:
        await agent.wait_log(r"report\.sent .*phase=ACTIVE")

    marks = [agent.mark() for agent in fleet]
    await server.kill()
    for agent, mark in zip(fleet, marks, strict=True):
        await agent.wait_log(r"stream\.ended .*UNAVAILABLE", after=mark)
        # Down, but still serving the last good bundle.
        assert agent.current_digest() == v1

    await server.start()
    for agent, mark in zip(fleet, marks, strict=True):
        await agent.wait_log(r"stream\.started .*mode=RESUME", after=mark)
        assert not re.search(r"stream\.reset|mode=BOOTSTRAP", agent.log_after(mark)), agent.log_after(mark)
    metrics = await server.metrics()
    assert metrics["controlplane_watch_bootstraps_total"] == 0
    assert metrics["controlplane_watch_resumes_total"] >= len(fleet)

    v2 = await control.upload(bundle({"main.kdl": b"v2"}))
    await control.assign(v2, selector="env=prod")
    for agent in fleet:
        await agent.wait_current(v2)
        assert agent.current_files() == {"main.kdl": b"v2"}
        await control.wait_node(agent.node_id, lambda n: n.applied_digest == v2, what="applied v2")


async def test_graceful_server_restart_rotates_streams_without_backoff(
    server: ServerProcess, control: ControlClient, spawn_agent: AgentFactory
) -> None:
    agent = spawn_agent("edge-1", {"env": "prod"})
    v1 = await control.upload(bundle({"main.kdl": b"v1"}))
    await control.assign(v1, selector="env=prod")
    await agent.wait_current(v1)
    mark = agent.mark()
    await server.stop()
    # SIGTERM: the server ends the stream with a closing bookmark.
    await agent.wait_log(r"stream\.closing", after=mark)
    await agent.wait_log(r"stream\.rotate", after=mark)
    await server.start()
    await agent.wait_log(r"stream\.started .*mode=RESUME", after=mark)
    assert agent.current_digest() == v1


@pytest.mark.server_args("--stream-lifetime", "1", "2")
async def test_stream_lifetime_rotation_resumes_at_once(
    control: ControlClient, spawn_agent: AgentFactory
) -> None:
    agent = spawn_agent("edge-1", {"env": "prod"})
    v1 = await control.upload(bundle({"main.kdl": b"v1"}))
    await control.assign(v1, selector="env=prod")
    await agent.wait_current(v1)
    mark = agent.mark()
    for _ in range(2):
        await agent.wait_log(r"stream\.rotate", after=mark)
        await agent.wait_log(r"stream\.started .*mode=RESUME", after=mark)
        mark = agent.mark()
    text = agent.log_since_start()
    assert "reconnect.wait" not in text, "a closing bookmark must not cost a backoff"
    assert len(re.findall(r"mode=BOOTSTRAP", text)) == 1
    assert agent.current_digest() == v1
