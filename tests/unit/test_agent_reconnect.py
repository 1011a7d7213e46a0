"""How an agent comes back after its server went away (watcher.py, servers.py,
backoff.py), against scripted control planes on loopback: several addresses, a server
that is not there, a server that says it is stopping.

The backoff here is slow on purpose (a minute): whatever brings the agent back within
the test's deadline is the probe cadence or a move to another address, never the
growing backoff."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest

from agent_stub.agent import Agent
from agent_stub.backoff import BackoffPolicy
from agent_stub.config import AgentConfig
from agent_stub.state import Cursor, Identity, MemoryStateStore
from controlplane.api.watch.v1 import watch_pb2 as pb
from tests.support.ports import refused_address, unused_port
from tests.unit.test_agent_watcher import FakeControlPlane, NullInstaller, Running, bootstrap, events, started

SLOW = BackoffPolicy(base=60.0, cap=60.0, probe_interval=0.1, probe_for=60.0)


def saved_state() -> MemoryStateStore:
    return MemoryStateStore(
        identity=Identity("n-1", "n-1.saved", "default", "edge-1", {"env": "prod"}),
        cursor=Cursor(revision=4, epoch="e1", node_id="n-1"),
    )


@pytest.fixture
async def planes() -> AsyncIterator[Callable[..., Any]]:
    made: list[FakeControlPlane] = []

    async def make(port: int = 0) -> FakeControlPlane:
        fake = FakeControlPlane()
        await fake.start(port)
        made.append(fake)
        return fake

    yield make
    for fake in made:
        await fake.stop()


@pytest.fixture
async def agents() -> AsyncIterator[Callable[..., Running]]:
    running: list[Running] = []

    def start(server: str, state: MemoryStateStore | None = None) -> Running:
        config = AgentConfig(
            server=server,
            project="default",
            token="enroll",
            labels={"env": "prod"},
            name="edge-1",
            liveness_timeout=5.0,
            backoff=SLOW,
            heartbeat_interval=0.2,
        )
        agent = Agent(
            config,
            state=state or MemoryStateStore(),
            installer=NullInstaller(),
            logger=logging.getLogger("test.agent"),
        )
        run = Running(agent)
        running.append(run)
        return run

    yield start
    for run in running:
        if not run.task.done():
            await run.stop()


async def test_an_agent_moves_past_an_address_nobody_answers(
    planes: Callable[..., Any], agents: Callable[..., Running]
) -> None:
    plane = await planes()
    plane.watch_script = [bootstrap(5)]
    with refused_address() as dead:
        run = agents(f"{dead},{plane.address}")
        await plane.wait_watch_calls(1)
        assert len(plane.registrations) == 1
        assert run.named("server.move")[0]["server"] == plane.address
        await run.wait_event("stream.open")
        assert run.agent.servers is not None and run.agent.servers.target == plane.address


async def test_an_agent_probes_a_server_that_is_not_there_until_it_is(
    planes: Callable[..., Any], agents: Callable[..., Running]
) -> None:
    port = unused_port()
    run = agents(f"127.0.0.1:{port}", saved_state())
    waits = await run.wait_event("reconnect.wait", 3)
    # Probes, not failures: the backoff (a minute) never grew.
    assert all(float(str(e["delay"])) <= 1.5 * SLOW.probe_interval for e in waits)
    assert run.agent.backoff.failures == 0
    plane = await planes(port)  # the server is back
    plane.watch_script = [bootstrap(9)]
    await plane.wait_watch_calls(1)
    assert plane.watch_calls[0][0].since_revision == 4


def closing_with_hint(revision: int, hint_ms: int) -> Any:
    """What a server that stops says to its streams: a closing bookmark, then when to
    come back (docs/protocol.md)."""

    async def play(request: pb.WatchBundlesRequest, context: Any) -> None:
        await context.write(
            events(
                started(pb.STREAM_MODE_RESUME),
                pb.WatchEvent(bookmark=pb.Bookmark(revision=revision, closing=True)),
            )
        )
        context.set_trailing_metadata((("retry-after-ms", str(hint_ms)),))

    return play


async def test_a_stopping_server_sends_its_streams_to_another_address(
    planes: Callable[..., Any], agents: Callable[..., Running]
) -> None:
    first, second = await planes(), await planes()
    first.watch_script = [closing_with_hint(7, 60_000)]
    run = agents(f"{first.address},{second.address}", saved_state())
    await second.wait_watch_calls(1)
    assert second.watch_calls[0][0].since_revision == 7
    assert run.named("server.move")[-1]["server"] == second.address


async def test_a_lone_stopping_server_is_left_alone_for_at_most_its_hint(
    planes: Callable[..., Any], agents: Callable[..., Running]
) -> None:
    plane = await planes()
    plane.watch_script = [closing_with_hint(7, 300)]
    run = agents(plane.address, saved_state())
    await plane.wait_watch_calls(2)
    waits = run.named("reconnect.wait")
    assert waits and float(str(waits[0]["delay"])) <= 0.3
    assert plane.watch_calls[1][0].since_revision == 7


async def test_a_server_shutting_down_is_probed_not_backed_off(
    planes: Callable[..., Any], agents: Callable[..., Running]
) -> None:
    plane = await planes()

    async def refuse(request: pb.WatchBundlesRequest, context: Any) -> None:
        context.set_trailing_metadata((("retry-after-ms", "50"),))
        await context.abort(grpc.StatusCode.UNAVAILABLE, "this server is shutting down; reconnect")

    plane.watch_script = [refuse, refuse, bootstrap(3)]
    run = agents(plane.address, saved_state())
    await plane.wait_watch_calls(3)
    assert len(run.named("stream.unreachable")) == 2
    assert run.agent.backoff.failures == 0
