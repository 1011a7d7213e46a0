"""Failover with real parts (issue 12): a private PostgreSQL primary and streaming standby
(tests/support/pgcluster.py), two control-plane replica processes on one multi-host URL,
and agents — real agent processes, or the simulator's in-process agents (the same
reconnect code) where every delivery must be recorded — with a rollout in flight.

- Synchronous replication: the primary SIGKILLed and the standby promoted lose nothing
  acknowledged (the audit chain still holds the checkpoint taken before, every
  acknowledged revision is there with its bundle), the rollout finishes writing each
  step once, agents keep their bundle and resume without a reset, audit verify passes.
- Asynchronous replication with forced loss: exactly the agents that saw a lost
  revision are reset (EPOCH_CHANGED) and bootstrap; the others resume; no revision is
  delivered twice with different content within one epoch.
- A control-plane replica SIGKILLed while it holds the agents' streams and a rollout's
  lease: the agents move to the other replica, which takes the rollout over.

Order of events is asserted, never time: bench/failover.py measures the time.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import grpc
import pytest

from agent_stub.backoff import BackoffPolicy
from agent_stub.simulator import FleetConfig, FleetSimulator, SimNode
from controlplane.api.audit.v1 import audit_pb2, audit_pb2_grpc
from tests.support import postgres
from tests.support.archives import bundle
from tests.support.eventually import eventually
from tests.support.pgcluster import pg_cluster
from tests.support.ports import unused_port
from tests.support.processes import AgentProcess, ControlClient, ServerProcess
from tests.support.rollout_fleet import Rollouts, archive, metrics_file_args, pb, seconds

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

T = TypeVar("T")
REPLICA_ARGS = ("--rollout-tick", "0.1", "--offline-after", "5", "--lease-ttl", "600")


async def retrying(call: Callable[[], Awaitable[T]], what: str, timeout: float = 60.0) -> T:
    """`call` until it succeeds: across a failover a client retries UNAVAILABLE."""

    async def attempt() -> T:
        try:
            return await call()
        except grpc.RpcError as e:
            raise AssertionError(f"{what}: {e.code().name}: {e.details()}") from None

    return await eventually(attempt, timeout=timeout, interval=0.1, what=what)


async def finished(rollouts: Rollouts, rollout_id: str, timeout: float = 120.0) -> pb.Rollout:
    async def done() -> pb.Rollout:
        rollout = await rollouts.get(rollout_id)
        assert rollout.state in (pb.ROLLOUT_STATE_SUCCEEDED, pb.ROLLOUT_STATE_ROLLED_BACK), rollout.state
        return rollout

    return await retrying(done, f"rollout {rollout_id} finished", timeout)


def leading(server: ServerProcess, rollout_id: str, after: int = 0) -> list[int]:
    pattern = rf"leading rollout {re.escape(rollout_id)} \(lease epoch (\d+)\)"
    return [int(m) for m in re.findall(pattern, server.log()[after:])]


class Deployment:
    """Two replicas sharing one data directory (keys, blobs) and one database URL."""

    def __init__(self, tmp_path: Path, url: str, extra: tuple[str, ...] = ()):
        data = tmp_path / "data"
        args = ("--database-url", url, *REPLICA_ARGS, *extra)
        self.a = ServerProcess(data, metrics_port=0, extra_args=args)
        # B's port is fixed up front: agents list both addresses before B may have started.
        self.b = ServerProcess(data, port=unused_port(), metrics_port=0, extra_args=args)
        self.tmp_path = tmp_path
        self.agents: list[AgentProcess] = []
        self.clients: list[ControlClient] = []

    @property
    def addresses(self) -> str:
        return f"{self.a.address},{self.b.address}"

    async def start(self, replicas: int = 2) -> None:
        await self.a.start()
        if replicas > 1:
            await self.b.start()

    def client(self, server: ServerProcess) -> ControlClient:
        client = ControlClient(server.address, credential=self.a.admin_key)
        self.clients.append(client)
        return client

    def agent(self, name: str, labels: dict[str, str], server: str) -> AgentProcess:
        agent = AgentProcess(
            server=server,
            token=self.a.token,
            state_dir=self.tmp_path / f"agent-{name}",
            name=name,
            labels=labels,
            extra_args=metrics_file_args(self.tmp_path / f"{name}-metrics.json"),
            trusted_keys=self.a.trusted_keys,
        )
        agent.start()
        self.agents.append(agent)
        return agent

    async def close(self) -> None:
        for client in self.clients:
            await client.close()
        for agent in self.agents:
            await agent.close()
        for server in (self.a, self.b):
            await server.close()


@pytest.fixture
async def deployments(tmp_path: Path) -> AsyncIterator[Callable[..., Deployment]]:
    made: list[Deployment] = []

    def make(url: str, extra: tuple[str, ...] = ()) -> Deployment:
        deployment = Deployment(tmp_path, url, extra)
        made.append(deployment)
        return deployment

    yield make
    for deployment in made:
        await deployment.close()
        for agent in deployment.agents:
            print(f"--- {agent.name}\n" + "\n".join(agent.log().splitlines()[-15:]))


# -- synchronous replication --------------------------------------------------------------


async def test_synchronous_failover_loses_nothing_acknowledged(
    deployments: Callable[..., Deployment], tmp_path: Path
) -> None:
    async with pg_cluster(synchronous=True) as cluster:
        d = deployments(cluster.url())
        await d.start()
        agents = [d.agent(f"edge-{i}", {"env": "prod"}, d.addresses) for i in range(3)]
        for agent in agents:
            await agent.wait_registered()
        control = d.client(d.b)
        rollouts = Rollouts(control.channel, metadata=control.metadata)
        v1 = await control.upload(archive("v1"))
        first = await rollouts.create(v1, strategy=pb.STRATEGY_ALL_AT_ONCE)
        assert (await finished(rollouts, first.id)).state == pb.ROLLOUT_STATE_SUCCEEDED
        v2 = await control.upload(archive("v2"))
        flight = await rollouts.create(v2, rolling=pb.RollingParams(batch_size=1), bake_time=seconds(2))

        async def in_flight() -> None:
            assert (await rollouts.get(flight.id)).progress.current_step >= 1

        await eventually(in_flight, timeout=60, what="the rollout's second step")
        # Mutations acknowledged just before the primary dies: assignments of bundles
        # nobody runs (a selector no node matches), and the audit chain's head.
        acknowledged = {}
        for i in range(5):
            digest = await control.upload(bundle({"main.kdl": f"spare {i}".encode()}))
            acknowledged[await control.assign(digest, selector="env=spare")] = digest
        audit = audit_pb2_grpc.AuditServiceStub(control.channel)
        checkpoint = await audit.VerifyAuditChain(
            audit_pb2.VerifyAuditChainRequest(), metadata=control.metadata
        )
        assert checkpoint.ok
        marks = [agent.mark() for agent in agents]

        cluster.kill_primary()
        await cluster.promote()

        done = await finished(rollouts, flight.id)
        assert done.state == pb.ROLLOUT_STATE_SUCCEEDED, done.reason
        events = await retrying(lambda: rollouts.events(flight.id), "rollout events")
        assert [e.step for e in events if e.kind == "write"] == [0, 1, 2]
        # Every acknowledged revision is on the promoted server, with its bundle.
        for revision, digest in acknowledged.items():
            stored = await cluster.standby.fetchval(
                "SELECT digest FROM desired_state_log WHERE revision = $1", revision
            )
            assert stored == digest, f"acknowledged revision {revision} lost"
        for agent in agents:
            await agent.wait_current(v2, timeout=60)
            after = agent.log()[marks[agents.index(agent)] :]
            assert "stream.reset" not in after, f"{agent.name} was reset:\n{after[-2000:]}"
        # The chain verifies and still holds the checkpoint taken before the failover.
        verify = await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable,
                "-m",
                "controlplane",
                "audit",
                "verify",
                "--server",
                d.addresses,
                "--checkpoint",
                f"{checkpoint.head_seq}:{checkpoint.head_mac}",
            ],
            capture_output=True,
            text=True,
            env={"CONTROLPLANE_API_KEY": d.a.admin_key, "PATH": "/usr/bin:/bin", "GRPC_VERBOSITY": "ERROR"},
            check=False,
        )
        assert verify.returncode == 0, verify.stdout + verify.stderr


# -- asynchronous replication with forced loss ---------------------------------------------


def group(sim: FleetSimulator, name: str) -> list[SimNode]:
    return [n for n in sim.nodes if n.name.startswith(name)]


async def all_run(nodes: list[SimNode], digest: str, what: str) -> None:
    async def check() -> None:
        assert all(n.digest == digest for n in nodes), [n.digest[:15] for n in nodes]

    await eventually(check, timeout=60, what=what)


def deliveries_are_consistent(node: SimNode, reset_at: int) -> None:
    """Within an epoch, a revision number always came with the same bundle. Deliveries
    before `reset_at` (the count seen when the node was reset) are of the old epoch."""
    for part in (node.observed[:reset_at], node.observed[reset_at:]):
        seen: dict[int, str] = {}
        for o in part:
            assert seen.setdefault(o.revision, o.digest) == o.digest, (
                f"{node.name}: revision {o.revision} delivered as {seen[o.revision]} and {o.digest}"
            )


async def test_asynchronous_failover_resets_exactly_the_agents_that_saw_lost_history(
    deployments: Callable[..., Deployment],
) -> None:
    async with pg_cluster(synchronous=False) as cluster:
        # Bookmarks rarely: an idle node's cursor then says only what it was sent.
        d = deployments(cluster.url(), ("--bookmark-interval", "600"))
        await d.start(replicas=1)
        control = d.client(d.a)
        sims = []
        for name in ("saw", "kept"):
            sim = FleetSimulator(
                FleetConfig(
                    server=d.a.address,
                    project="default",
                    token=d.a.token,
                    nodes=3,
                    labels={"env": "prod", "group": name},
                    name_prefix=name,
                    heartbeat_interval=1.0,
                    backoff=BackoffPolicy(base=0.2, cap=2.0),
                )
            )
            sims.append(sim)
        try:
            for sim in sims:
                await sim.start()
                await sim.wait_registered()
            saw, kept = group(sims[0], "saw"), group(sims[1], "kept")
            v1 = await control.upload(bundle({"main.kdl": b"v1"}))
            await control.assign(v1, selector="env=prod")
            await all_run(saw + kept, v1, "v1 everywhere")

            await cluster.pause_replication()
            lost = await control.upload(bundle({"main.kdl": b"lost"}))
            lost_revision = await control.assign(lost, selector="group=saw")
            await all_run(saw, lost, "the lost revision applied by one group")
            cursors = {n.name: n.agent.cursor for n in saw + kept if n.agent is not None}
            assert all(cursors[n.name].revision >= lost_revision for n in saw)
            assert all(cursors[n.name].revision < lost_revision for n in kept)
            counts = {n.name: (n.agent.counters.resets, len(n.observed)) for n in saw + kept if n.agent}

            cluster.kill_primary()
            await cluster.promote()
            # The loss is real before anything is said about agents.
            head = await cluster.standby.fetchval("SELECT value FROM revision_counter")
            assert head < lost_revision

            # The same revision number, other content, in the new epoch.
            reused = await control.upload(bundle({"main.kdl": b"after"}))
            revision = await retrying(lambda: control.assign(reused, selector="group=saw"), "assign after")
            assert revision == lost_revision
            await all_run(saw, reused, "the new bundle after the failover")
            old_epoch = next(iter(cursors.values())).epoch

            async def moved_on() -> None:
                for n in saw + kept:
                    assert n.agent is not None and n.agent.cursor.epoch not in ("", old_epoch), n.name

            await eventually(moved_on, timeout=60, what="every agent in the new epoch")
            for n in saw:
                assert n.agent is not None and n.agent.counters.resets > counts[n.name][0], (
                    f"{n.name} saw lost revision {lost_revision} and resumed silently"
                )
                deliveries_are_consistent(n, counts[n.name][1])
            for n in kept:
                assert n.agent is not None and n.agent.counters.resets == counts[n.name][0], (
                    f"{n.name} lost nothing but was reset"
                )
                assert n.digest == v1
                deliveries_are_consistent(n, 0)
        finally:
            for sim in sims:
                await sim.stop()


# -- control-plane replica loss ------------------------------------------------------------


@pytest.fixture
async def pg_database() -> AsyncIterator[str]:
    await postgres.ensure_running()
    url = await postgres.create_database()
    try:
        yield url
    finally:
        await postgres.drop_database(url)


async def test_losing_the_replica_with_the_streams_and_the_lease(
    deployments: Callable[..., Deployment], pg_database: str
) -> None:
    d = deployments(pg_database)
    # B starts once A leads: two drivers racing for a new rollout's lease would decide
    # who leads by timing, and this scenario needs A to.
    await d.start(replicas=1)
    # The agents list A first: their streams are on A, like the rollout's lease.
    agents = [d.agent(f"edge-{i}", {"env": "prod"}, d.addresses) for i in range(3)]
    for agent in agents:
        await agent.wait_registered()
    control = d.client(d.a)
    rollouts = Rollouts(control.channel, metadata=control.metadata)
    v1 = await control.upload(archive("v1"))
    # A bake long enough that A cannot finish the rollout while B starts: the takeover
    # happens mid-rollout, whatever the load.
    created = await rollouts.create(v1, rolling=pb.RollingParams(batch_size=1), bake_time=seconds(8))

    async def led_by_a() -> None:
        assert leading(d.a, created.id) == [1] and (await rollouts.get(created.id)).progress.current_step >= 1

    await eventually(led_by_a, timeout=60, what="A leads and step 1 is written")
    await d.b.start()
    assert all(a.log_since_start().count("server.move") == 0 for a in agents)
    b_mark = len(d.b.log())
    agent_marks = [a.mark() for a in agents]
    await d.a.kill()

    survivor = d.client(d.b)
    rollouts = Rollouts(survivor.channel, metadata=survivor.metadata)
    done = await finished(rollouts, created.id)
    assert done.state == pb.ROLLOUT_STATE_SUCCEEDED, done.reason
    events = await rollouts.events(created.id)
    assert [e.step for e in events if e.kind == "write"] == [0, 1, 2]
    # In order: A died, then B led, under the next epoch; the agents moved to B.
    assert leading(d.b, created.id) == leading(d.b, created.id, b_mark) == [2]
    for agent, mark in zip(agents, agent_marks, strict=True):
        await agent.wait_log(rf"server\.move .*server={re.escape(d.b.address)}", after=mark)
        await agent.wait_current(v1)
