"""`serve --workers 2`: two serving processes behind one port, seen as one server.

Real processes on SQLite and on PostgreSQL: streams opened on the shared port land on
both workers; a write on one worker (its private address) reaches the watchers of the
other with no gap; a write on one is seen by the next call and the next stream on the
other (read your writes across processes); writes racing on both workers reach every
stream in revision order, each with its own bundle; a lease-held job (the fleet gauges) runs in
one worker only; the shared metrics endpoint adds both workers' counts; a killed worker
is started again and its agents reconnect.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from controlplane.api.bundle.v1 import bundle_pb2, bundle_pb2_grpc
from controlplane.api.identity.v1 import identity_pb2, identity_pb2_grpc
from controlplane.api.node.v1 import node_pb2, node_pb2_grpc
from controlplane.api.watch.v1 import watch_pb2, watch_pb2_grpc
from controlplane.cli.workers import WORKERS_FILE
from tests.e2e.conftest import AgentFactory
from tests.support.archives import bundle
from tests.support.eventually import eventually
from tests.support.harness import CHUNK, Recorder, Registered, auth, signing
from tests.support.processes import ServerProcess

pytestmark = [pytest.mark.e2e, pytest.mark.server_args("--workers", "2")]

# Streams opened through the shared port, each on its own connection: the kernel spreads
# connections, not streams, over the workers.
CONNECTIONS = 16


class Plane:
    """Typed clients on one address (the shared port or one worker's own), each call on
    a connection of its own when asked."""

    def __init__(self, address: str, admin_key: str, enrollment: str):
        self.address = address
        self.admin_key = admin_key
        self.enrollment = enrollment
        self.channels: list[grpc.aio.Channel] = []
        self.channel = self.connect()

    def connect(self) -> grpc.aio.Channel:
        # A local subchannel pool: a connection of its own, never shared with another channel.
        channel = grpc.aio.insecure_channel(
            self.address,
            options=[("grpc.use_local_subchannel_pool", 1)],
            interceptors=signing(self.admin_key),
        )
        self.channels.append(channel)
        return channel

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()

    async def register(self, name: str, labels: dict[str, str]) -> Registered:
        nodes = node_pb2_grpc.NodeServiceStub(self.channel)
        reply = await nodes.RegisterNode(
            node_pb2.RegisterNodeRequest(
                project="default", enrollment_token=self.enrollment, name=name, labels=labels
            )
        )
        issued = await identity_pb2_grpc.IdentityServiceStub(self.channel).IssueNodeToken(
            identity_pb2.IssueNodeTokenRequest(node_id=reply.node_id), metadata=auth(reply.node_credential)
        )
        return Registered(reply.node_id, reply.node_credential, issued.token)

    async def upload(self, files: dict[str, bytes]) -> str:
        archive = bundle(files)

        async def requests() -> AsyncIterator[bundle_pb2.UploadBundleRequest]:
            header = bundle_pb2.UploadBundleHeader(project="default")
            for offset in range(0, len(archive), CHUNK):
                yield bundle_pb2.UploadBundleRequest(
                    header=header if offset == 0 else None, chunk=archive[offset : offset + CHUNK]
                )

        reply = await bundle_pb2_grpc.BundleServiceStub(self.channel).UploadBundle(requests())
        return str(reply.bundle.digest)

    async def assign(self, digest: str, selector: str) -> int:
        reply = await bundle_pb2_grpc.BundleServiceStub(self.channel).AssignBundle(
            bundle_pb2.AssignBundleRequest(
                project="default", target=bundle_pb2.Target(selector=selector), digest=digest
            )
        )
        return int(reply.revision)

    async def node(self, node_id: str) -> node_pb2.Node:
        reply = await node_pb2_grpc.NodeServiceStub(self.channel).GetNode(
            node_pb2.GetNodeRequest(node_id=node_id)
        )
        return reply.node

    def watch(self, node: Registered, own_connection: bool = False) -> Recorder:
        channel = self.connect() if own_connection else self.channel
        call = watch_pb2_grpc.WatchServiceStub(channel).WatchBundles(
            watch_pb2.WatchBundlesRequest(node_id=node.node_id), metadata=node.metadata
        )
        return Recorder(call)


def workers(server: ServerProcess) -> list[dict[str, Any]]:
    table = json.loads((server.data_dir / WORKERS_FILE).read_text())
    return list(table["workers"])


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def sample(text: str, name: str) -> float:
    """The value of an unlabelled sample (0 when absent)."""
    found = re.search(rf"^{re.escape(name)}(?:{{}})? ([-+0-9.eE]+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


async def metrics(url: str) -> str:
    return await asyncio.to_thread(scrape, url)


@pytest.fixture
async def planes(server: ServerProcess) -> AsyncIterator[tuple[Plane, Plane, Plane]]:
    """The shared port, worker 0's own address, worker 1's own address."""
    table = workers(server)
    assert [w["index"] for w in table] == [0, 1]
    addresses = (server.address, *(w["address"] for w in table))
    made = [Plane(a, server.admin_key, server.token) for a in addresses]
    try:
        yield made[0], made[1], made[2]
    finally:
        for plane in made:
            await plane.close()


def gap_free(recorder: Recorder) -> None:
    """Revisions of desired states and bookmarks never go backwards."""
    revisions = [
        getattr(e, str(e.WhichOneof("event"))).revision
        for e in recorder.events
        if e.WhichOneof("event") in ("desired", "bookmark", "snapshot_end")
    ]
    assert revisions == sorted(revisions), revisions


@pytest.mark.both_backends
async def test_two_workers_serve_one_port_as_one_server(
    server: ServerProcess, planes: tuple[Plane, Plane, Plane]
) -> None:
    shared, first, second = planes
    table = workers(server)
    nodes = [await shared.register(f"edge-{i}", {"env": "dev", "slot": str(i)}) for i in range(CONNECTIONS)]
    streams = [shared.watch(node, own_connection=True) for node in nodes]
    for stream in streams:
        await stream.wait_for(lambda r: bool(r.of("snapshot_end")), 20, "the bootstrap")

    # The kernel spread the connections: each worker holds some of the streams.
    per_worker = [sample(await metrics(w["metrics"]), "controlplane_watch_streams_open") for w in table]
    assert sum(per_worker) == CONNECTIONS and all(n > 0 for n in per_worker), per_worker

    # A write on worker 0 reaches every stream, those worker 1 serves included.
    digest = await first.upload({"nginx.conf": b"events {}\n"})
    revision = await first.assign(digest, "env=dev")
    for stream in streams:
        desired = await stream.wait_digest(digest, 20)
        assert desired.revision == revision
        gap_free(stream)

    # A write on worker 1, then on worker 0: each reaches all streams, in order.
    later = await second.upload({"nginx.conf": b"events { worker_connections 64; }\n"})
    await second.assign(later, "env=dev")
    for stream in streams:
        await stream.wait_digest(later, 20)
        gap_free(stream)

    # Read your writes across processes: a write answered by one worker is in the next
    # read and the next stream on the other, however soon they come.
    digests = [digest, later]
    for round_ in range(8):
        writer, reader = (first, second) if round_ % 2 == 0 else (second, first)
        target = nodes[round_]
        want = digests[round_ % 2]
        revision = await writer.assign(want, f"slot={round_}")
        got = await reader.node(target.node_id)
        assert (got.desired_digest, got.desired_revision) == (want, revision)
        fresh = reader.watch(target)
        await fresh.wait_for(lambda r: bool(r.of("snapshot_end")), 20, "the bootstrap")
        assert fresh.of("desired")[-1].digest == want
        assert fresh.of("snapshot_end")[0].revision >= revision
        await fresh.cancel()

    # The fleet gauges are one lease's job: exactly one worker exports them.
    async def one_exporter() -> None:
        texts = [await metrics(w["metrics"]) for w in table]
        exporting = [t for t in texts if re.search(r"^controlplane_fleet_nodes\{", t, re.MULTILINE)]
        assert len(exporting) == 1, [bool(e) for e in exporting]

    await eventually(one_exporter, timeout=20, what="one worker exporting the fleet gauges")

    # One scrape of the shared endpoint adds both workers' counts.
    assert server.metrics_port
    aggregate = await metrics(f"http://127.0.0.1:{server.metrics_port}/metrics")
    own = [await metrics(w["metrics"]) for w in table]
    name = "controlplane_watch_bootstraps_total"
    assert all(sample(t, name) > 0 for t in own), [sample(t, name) for t in own]
    assert sample(aggregate, name) == sum(sample(t, name) for t in own)
    assert sample(aggregate, "controlplane_watch_streams_open") == CONNECTIONS
    assert re.search(r"^controlplane_fleet_nodes\{", aggregate, re.MULTILINE), "no fleet gauges"
    for stream in streams:
        await stream.cancel()


@pytest.mark.both_backends
async def test_writes_racing_on_both_workers_reach_every_stream_in_one_order(
    server: ServerProcess, planes: tuple[Plane, Plane, Plane]
) -> None:
    """Two processes write at once (each through its own address): every revision is
    handed out once, and every stream, whichever worker serves it, receives the writes
    in revision order, each with the bundle of its write, and ends on the newest. (The
    watch is level-triggered: of revisions of one key read together, a stream is sent
    the newest only, so it need not see every one.)"""
    shared, first, second = planes
    nodes = [await shared.register(f"race-{i}", {"race": "yes"}) for i in range(8)]
    streams = [shared.watch(node, own_connection=True) for node in nodes]
    for stream in streams:
        await stream.wait_for(lambda r: bool(r.of("snapshot_end")), 20, "the bootstrap")
    digests = [
        await first.upload({"nginx.conf": f"events {{ worker_connections {64 + i}; }}\n".encode()})
        for i in range(4)
    ]

    async def writer(plane: Plane, offset: int) -> list[tuple[int, str]]:
        done = []
        for k in range(12):
            digest = digests[(offset + k) % len(digests)]
            done.append((await plane.assign(digest, "race=yes"), digest))
        return done

    by_first, by_second = await asyncio.gather(writer(first, 0), writer(second, 1))
    writes = dict(by_first + by_second)
    assert len(writes) == 24, "a revision handed out twice"
    last = max(writes)
    for stream in streams:
        await stream.wait_for(
            lambda r: any(d.revision == last for d in r.of("desired")), 20, f"revision {last}"
        )

    for stream in streams:
        seen = [(d.revision, d.digest) for d in stream.of("desired") if d.revision in writes]
        revisions = [revision for revision, _ in seen]
        assert revisions == sorted(set(revisions)), f"out of order or twice: {revisions}"
        assert all(writes[revision] == digest for revision, digest in seen), seen
        assert seen[-1] == (last, writes[last])
    for stream in streams:
        await stream.cancel()


async def test_a_killed_worker_is_started_again_and_its_agents_come_back(
    server: ServerProcess, spawn_agent: AgentFactory, tmp_path: Path
) -> None:
    agents = [spawn_agent(f"edge-{i}", {"env": "dev"}) for i in range(4)]
    for agent in agents:
        await agent.wait_registered()
    shared = Plane(server.address, server.admin_key, server.token)
    try:
        digest = await shared.upload({"nginx.conf": b"events {}\n"})
        await shared.assign(digest, "env=dev")
        for agent in agents:
            await agent.wait_current(digest)

        victim = workers(server)[0]
        os.kill(victim["pid"], signal.SIGKILL)

        async def replaced() -> None:
            now = workers(server)[0]
            assert now["pid"] != victim["pid"], "not started again yet"
            await ServerProcess.health(server)

        await eventually(replaced, timeout=60, what="worker 0 started again")
        assert re.search(r"worker 0 \(pid \d+\) exited with code -9", server.log()), server.log()[-2000:]

        # Every agent is served again (whichever worker it reconnected to) and converges.
        later = await shared.upload({"nginx.conf": b"events { worker_connections 64; }\n"})
        await shared.assign(later, "env=dev")
        for agent in agents:
            await agent.wait_current(later, timeout=40)
    finally:
        await shared.close()


async def test_sigterm_stops_every_worker(server: ServerProcess) -> None:
    pids = [w["pid"] for w in workers(server)]
    assert await server.stop() == 0
    assert "shutting down: streams get a closing bookmark" in server.log()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
