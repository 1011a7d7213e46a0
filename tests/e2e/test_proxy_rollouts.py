"""Rollouts to real proxies: agent processes driving nginx, HAProxy and Envoy against a
real control plane, with requests going through the proxies the whole time.

Every node runs the same bundle on the same loopback port (SO_REUSEPORT, as hosts behind
a load balancer), so one request loop reaches every node's proxy; what each node serves is
asked on its own status endpoint. No node has a metrics file: health, 5xx rate and p99 come
from the proxies' own statistics."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from agent_stub.applier import HOLD_AFTER_SWAP
from controlplane.api.node.v1 import node_pb2
from controlplane.proxies import ProxyKind
from tests.e2e.conftest import AgentFactory
from tests.support.archives import bundle
from tests.support.eventually import eventually
from tests.support.ports import unused_port
from tests.support.processes import FAST_AGENT_ARGS, AgentProcess, ControlClient, ServerProcess
from tests.support.proxies import (
    KINDS,
    RequestLoop,
    agent_proxy_args,
    binary,
    kill_proxy,
    proxy_files,
    proxy_reloads,
    refused_files,
    served_digest,
    stop_proxies,
    upstreams,
)
from tests.support.rollout_fleet import SERVER_ARGS, Rollouts, pb, seconds

pytestmark = [pytest.mark.e2e, pytest.mark.parametrize("kind", KINDS), pytest.mark.server_args(*SERVER_ARGS)]

NODES = 3


class Fleet:
    def __init__(self, kind: ProxyKind, agents: list[AgentProcess], status: list[int], port: int):
        self.kind = kind
        self.agents = agents
        self.status = status
        self.port = port

    async def served(self) -> list[str]:
        return [await served_digest(self.kind, s) for s in self.status]

    async def wait_served(self, digest: str, nodes: range | None = None) -> None:
        async def check() -> None:
            served = await self.served()
            assert all(served[i] == digest for i in nodes or range(NODES)), f"served {served}, want {digest}"

        await eventually(check, timeout=30, what=f"every node serving {digest}")

    def reloads(self) -> list[int]:
        return [proxy_reloads(self.kind, a.state_dir) for a in self.agents]


FleetFactory = Callable[..., Fleet]


@pytest.fixture
async def fleet(kind: ProxyKind, spawn_agent: AgentFactory, tmp_path: Path) -> AsyncIterator[FleetFactory]:
    agents: list[AgentProcess] = []
    binary(kind)  # missing: the test fails saying how to install it, before any agent starts

    def make(hold: Path | None = None) -> Fleet:
        status = [unused_port() for _ in range(NODES)]
        for i in range(NODES):
            env = {HOLD_AFTER_SWAP: str(hold)} if hold is not None and i == 0 else None
            args = (*FAST_AGENT_ARGS, *agent_proxy_args(kind, status[i]))
            agents.append(
                spawn_agent(f"edge-{i}", {"env": "prod"}, apply_command="", extra_args=args, env=env)
            )
        return Fleet(kind, agents, status, unused_port())

    try:
        yield make
    finally:
        for agent in agents:
            stop_proxies(agent.state_dir)


async def test_rolling_rollout_refusal_and_a_crash_between_swap_and_confirmation(
    kind: ProxyKind, server: ServerProcess, control: ControlClient, fleet: FleetFactory, tmp_path: Path
) -> None:
    hold = tmp_path / "hold"
    hold.touch()  # present: installs go straight on
    nodes = fleet(hold)
    ids = [await a.wait_registered() for a in nodes.agents]
    rollouts = Rollouts(control.channel, metadata=control.metadata)
    with upstreams() as ups:

        def files(upstream: str) -> dict[str, bytes]:
            return proxy_files(kind, nodes.port, ups[upstream].port)

        # The default gate (a healthy heartbeat) passes on the proxies' own word alone.
        v1 = await control.upload(bundle(files("v1")), version="v1")
        first = await rollouts.create(v1, strategy=pb.STRATEGY_ALL_AT_ONCE)
        assert (await rollouts.watch(first.id)).last_state == pb.ROLLOUT_STATE_SUCCEEDED
        await nodes.wait_served(v1)

        loop = RequestLoop(nodes.port).start()
        try:
            await loop.wait_for(30)
            v2 = await control.upload(bundle(files("v2")), version="v2")
            rolling = await rollouts.create(v2, rolling=pb.RollingParams(batch_size=1), bake_time=seconds(1))
            watched = await rollouts.watch(rolling.id, timeout=90)
            assert watched.last_state == pb.ROLLOUT_STATE_SUCCEEDED, watched.messages("step")
            await nodes.wait_served(v2)
            done = loop.mark()
            await loop.wait_for(40)
            assert loop.failures() == [], loop.counts()
            assert loop.since(0)[0] == "v1" and set(loop.since(done)) == {"v2"}, loop.counts()

            # A bundle the proxy's own validator refuses: FAILED with its words, no reload.
            before = nodes.reloads()
            refused, phrase = refused_files(kind, nodes.port, ups["v1"].port)
            bad = await control.upload(bundle(refused), version="refused")
            nacked = await rollouts.create(bad, rolling=pb.RollingParams(batch_size=1))
            assert (await rollouts.watch(nacked.id, timeout=60)).last_state == pb.ROLLOUT_STATE_ROLLED_BACK
            reason = (await rollouts.get(nacked.id)).reason
            assert "rejected the bundle" in reason and phrase in reason and f"{kind} " in reason, reason
            assert (await control.get_node(ids[0])).applied_digest == v2
            assert nodes.reloads() == before, "no proxy reloaded"
            assert await nodes.served() == [v2] * NODES
            mark = loop.mark()
            await loop.wait_for(30)
            assert set(loop.since(mark)) == {"v2"}

            # SIGKILL between the swap and the confirmation: the restarted agent makes
            # the proxy serve `current` before it reports anything.
            v3_files = files("v1")
            v3_files[next(iter(v3_files))] += b"\n# v3: back to the v1 upstream\n"
            v3 = await control.upload(bundle(v3_files), version="v3")
            agent = nodes.agents[0]
            hold.unlink()
            at = agent.mark()
            await control.assign(v3, nodes=[ids[0]])
            await agent.wait_log(r"fault\.hold", after=at, timeout=30)
            assert await served_digest(kind, nodes.status[0]) == v2, "held before the proxy was told"
            await agent.kill()
            hold.touch()
            agent.start()
            await agent.wait_log(r"stream\.started", timeout=30)
            log = agent.log_since_start()
            assert log.index("reconcile.") < log.index("stream.started"), log[-2000:]
            assert await served_digest(kind, nodes.status[0]) == v3

            async def agreed() -> node_pb2.Node:
                n = await control.get_node(ids[0])
                assert n.applied_digest == v3 and n.last_heartbeat.applied_digest == v3, n
                return n

            await eventually(agreed, timeout=30, what="the node reporting what its proxy serves")
            assert loop.failures() == [], loop.counts()
        finally:
            await loop.stop()


async def test_a_canary_failing_on_5xx_rolls_back_and_a_dead_proxy_fails_gates(
    kind: ProxyKind, server: ServerProcess, control: ControlClient, fleet: FleetFactory
) -> None:
    nodes = fleet()
    ids = [await a.wait_registered() for a in nodes.agents]
    rollouts = Rollouts(control.channel, metadata=control.metadata)
    with upstreams() as ups:
        v1 = await control.upload(bundle(proxy_files(kind, nodes.port, ups["v1"].port)), version="v1")
        first = await rollouts.create(v1, strategy=pb.STRATEGY_ALL_AT_ONCE)
        assert (await rollouts.watch(first.id)).last_state == pb.ROLLOUT_STATE_SUCCEEDED
        await nodes.wait_served(v1)

        loop = RequestLoop(nodes.port).start()
        try:
            # Validates, but its route leads to the upstream answering 503.
            bad = await control.upload(bundle(proxy_files(kind, nodes.port, ups["bad"].port)), version="bad")
            canary = await rollouts.create(
                bad,
                strategy=pb.STRATEGY_CANARY,
                canary=pb.CanaryParams(steps_percent=[34, 100]),
                gates=pb.HealthGates(require_healthy=True, max_error_rate=0.05),
                bake_time=seconds(20),
                gate_failure_window=seconds(2),
            )
            assert (await rollouts.watch(canary.id, timeout=90)).last_state == pb.ROLLOUT_STATE_ROLLED_BACK
            reason = (await rollouts.get(canary.id)).reason
            assert "error_rate" in reason, reason
            assert "HTTP 503" in loop.counts(), "the canary's proxy answered 503s"
            await nodes.wait_served(v1)
            mark = loop.mark()
            await loop.wait_for(60)
            assert set(loop.since(mark)) == {"v1"}, loop.counts(mark)
        finally:
            await loop.stop()

        # The proxy of one node dies: its heartbeats say so, and gates on it fail.
        kill_proxy(kind, nodes.agents[2].state_dir)
        node = await control.wait_node(
            ids[2],
            lambda n: n.last_heartbeat.metrics.health == node_pb2.HEALTH_STATUS_UNHEALTHY,
            timeout=20,
            what="an unhealthy heartbeat",
        )
        assert node.applied_digest == v1
        healthy = await control.get_node(ids[0])
        assert healthy.last_heartbeat.metrics.health == node_pb2.HEALTH_STATUS_HEALTHY
        gated = await rollouts.create(
            v1, strategy=pb.STRATEGY_ALL_AT_ONCE, bake_time=seconds(20), gate_failure_window=seconds(2)
        )
        assert (await rollouts.watch(gated.id, timeout=60)).last_state == pb.ROLLOUT_STATE_ROLLED_BACK
        reason = (await rollouts.get(gated.id)).reason
        assert ids[2] in reason and ids[0] not in reason, reason
