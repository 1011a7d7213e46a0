"""Fixtures for end-to-end tests: a real server process and real agent processes.

`server` starts `python -m controlplane serve` on a free port (SQLite, bookmarks every
second, metrics on another free port). Extra server flags come from a
`@pytest.mark.server_args(...)` marker; a test marked `@pytest.mark.both_backends` runs
twice, the second time with the server on a fresh PostgreSQL database. `spawn_agent`
starts agents against it and stops them all afterwards; on a failure the captured output
holds every log tail.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path

import pytest

from tests.support import postgres
from tests.support.processes import (
    FAST_AGENT_ARGS,
    AgentProcess,
    ControlClient,
    ServerProcess,
)

AgentFactory = Callable[..., AgentProcess]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "server_args(*args): extra flags for the e2e server process")
    config.addinivalue_line("markers", "both_backends: run on SQLite and on PostgreSQL")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.definition.get_closest_marker("both_backends") is not None:
        metafunc.parametrize("e2e_backend", ["sqlite", "postgres"])


@pytest.fixture
def e2e_backend() -> str:
    """The server's database; `both_backends` tests are parametrized over it."""
    return "sqlite"


@pytest.fixture
async def server(
    request: pytest.FixtureRequest, tmp_path: Path, e2e_backend: str
) -> AsyncIterator[ServerProcess]:
    marker = request.node.get_closest_marker("server_args")
    extra: tuple[str, ...] = tuple(marker.args) if marker is not None else ()
    url = ""
    if e2e_backend == "postgres":
        await postgres.ensure_running()
        url = await postgres.create_database()
        extra = ("--database-url", url, *extra)
    srv = ServerProcess(tmp_path / "server", metrics_port=0, extra_args=extra)
    try:
        await srv.start()
        yield srv
    finally:
        await srv.close()
        print(f"--- server log tail ({srv.log_path})")
        print("\n".join(srv.log().splitlines()[-30:]))
        if url:
            await postgres.drop_database(url)


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
        env: Mapping[str, str] | None = None,
    ) -> AgentProcess:
        agent = AgentProcess(
            server=server.address,
            token=server.token,
            state_dir=tmp_path / f"agent-{name}",
            name=name,
            labels=dict(labels or {}),
            apply_command=apply_command,
            extra_args=tuple(extra_args),
            env=dict(env or {}),
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
