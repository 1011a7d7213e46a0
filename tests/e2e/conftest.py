"""Fixtures for end-to-end tests: a real server process and real agent processes.

`server` starts `python -m controlplane serve` on a free port (SQLite, bookmarks every
second, metrics on another free port). Extra server flags come from a
`@pytest.mark.server_args(...)` marker. `spawn_agent` starts agents against it and stops
them all afterwards; on a failure the captured output holds every log tail.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path

import pytest

from tests.support.processes import (
    FAST_AGENT_ARGS,
    AgentProcess,
    ControlClient,
    ServerProcess,
    free_port,
)

AgentFactory = Callable[..., AgentProcess]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "server_args(*args): extra flags for the e2e server process")


@pytest.fixture
async def server(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ServerProcess]:
    marker = request.node.get_closest_marker("server_args")
    extra = tuple(marker.args) if marker is not None else ()
    srv = ServerProcess(tmp_path / "server", metrics_port=free_port(), extra_args=extra)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.close()
        print(f"--- server log tail ({srv.log_path})")
        print("\n".join(srv.log().splitlines()[-30:]))


@pytest.fixture
async def control(server: ServerProcess) -> AsyncIterator[ControlClient]:
    client = ControlClient(server.address)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def spawn_agent(server: ServerProcess, tmp_path: Path) -> AsyncIterator[AgentFactory]:
    agents: list[AgentProcess] = []

    def spawn(
        name: str,
        labels: Mapping[str, str] | None = None,
        apply_command: str = "true",
        extra_args: Sequence[str] = FAST_AGENT_ARGS,
    ) -> AgentProcess:
        agent = AgentProcess(
            server=server.address,
            token=server.token,
            state_dir=tmp_path / f"agent-{name}",
            name=name,
            labels=dict(labels or {}),
            apply_command=apply_command,
            extra_args=tuple(extra_args),
        )
        agent.start()
        agents.append(agent)
        return agent

    try:
        yield spawn
    finally:
        for agent in agents:
            await agent.close()
        for agent in agents:
            print(f"--- agent {agent.name} log tail ({agent.log_path})")
            print("\n".join(agent.log().splitlines()[-25:]))
