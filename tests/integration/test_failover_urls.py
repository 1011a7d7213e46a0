"""A replicated PostgreSQL as a deployment: multi-host URLs for the pool and the LISTEN
connection alike (store/pgconnect.py), and both following a promotion on their own.

Two replicas share a real primary and streaming standby (tests/support/pgcluster.py),
named by one URL listing both hosts. Replica B sweeps so rarely that whatever it learns
of A's writes within the test came by NOTIFY, i.e. through its LISTEN connection.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest

from controlplane.api.watch.v1 import watch_pb2 as wpb
from controlplane.store.pgconnect import PgConnector
from controlplane.watch.hub import HubSettings
from tests.support import postgres
from tests.support.archives import bundle
from tests.support.eventually import eventually
from tests.support.harness import Harness, Registered
from tests.support.pgcluster import pg_cluster
from tests.support.planes import Planes

pytestmark = pytest.mark.postgres

# Far beyond the test: B's hub reads only when woken, and across replicas only NOTIFY wakes it.
SLOW_SWEEP = 600.0


def listening_on(plane: Harness, port: int) -> Callable[[], Awaitable[None]]:
    async def check() -> None:
        listener = plane.app._listener
        assert listener is not None and listener.connected.is_set(), "not LISTENing"
        assert listener.connected_to == f"127.0.0.1:{port}", f"LISTENing on {listener.connected_to}"

    return check


async def assign_until_accepted(plane: Harness, digest: str, node: Registered) -> tuple[int, int]:
    """Assign as an operator would retry one: until the control plane accepts it.
    Returns the revision and how many attempts were refused UNAVAILABLE first."""
    refused = 0
    while True:
        try:
            return await plane.assign(digest, nodes=[node.node_id]), refused
        except grpc.aio.AioRpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE, e
            refused += 1
            await asyncio.sleep(0.1)


@pytest.mark.parametrize("order", ["primary first", "standby first"])
async def test_pool_and_listener_follow_a_promotion(planes: Planes, order: str) -> None:
    async with pg_cluster(synchronous=True) as cluster:
        servers = (cluster.primary, cluster.standby)
        url = cluster.url(*(servers if order == "primary first" else servers[::-1]))
        a = await planes.start(url)
        b = await planes.start(url, hub=HubSettings(bookmark_interval=1.0, sweep_interval=SLOW_SWEEP))
        for plane in (a, b):
            await eventually(listening_on(plane, cluster.primary.port), what="LISTEN on the primary")
        node = await a.register("edge-1")
        before = await a.upload(bundle({"main.conf": b"before"}))
        after = await a.upload(bundle({"main.conf": b"after"}))
        first = await a.assign(before, nodes=[node.node_id])
        on_b = b.open_watch(node)
        await on_b.wait_digest(before)

        cluster.kill_primary()
        await cluster.promote()
        revision, _ = await assign_until_accepted(a, after, node)
        assert revision == first + 1
        # B's stream ended when B read the new epoch; the node resumes (synchronous: the
        # fork point is the old head) and the change reaches it by NOTIFY through B's
        # listener, now on the promoted server.
        await on_b.ended.wait()
        for plane in (a, b):
            await eventually(listening_on(plane, cluster.standby.port), what="LISTEN on the new primary")
        cursor, epoch = on_b.last_revision(), on_b.epoch
        node.token = await b.node_token(node)
        resumed = b.open_watch(node, since=cursor, epoch=epoch)
        await resumed.wait_digest(after)
        started = resumed.of("started")[0]
        assert started.mode == wpb.STREAM_MODE_RESUME and started.epoch != epoch
        assert "reset" not in resumed.kinds
        again = await a.upload(bundle({"main.conf": b"again"}))
        await a.assign(again, nodes=[node.node_id])
        await resumed.wait_digest(again)
        await resumed.cancel()


class SilentHost:
    """A TCP port that accepts connections and never answers: a host that is not dead
    enough to refuse, like a machine whose PostgreSQL hangs."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.setblocking(False)
        self.port = int(self.sock.getsockname()[1])
        self.accepted: list[socket.socket] = []

    def drain(self) -> int:
        """Accept what is waiting; the number of connections seen so far."""
        while True:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return len(self.accepted)
            self.accepted.append(conn)

    def close(self) -> None:
        for conn in self.accepted:
            conn.close()
        self.sock.close()


@pytest.fixture
async def silent() -> AsyncIterator[SilentHost]:
    host = SilentHost()
    try:
        yield host
    finally:
        host.close()


async def test_a_hanging_host_costs_its_own_timeout_once(silent: SilentHost) -> None:
    """asyncpg tries several hosts under one timeout, which a hanging first host uses up;
    each host gets its own here, and the one that answered comes first next time."""
    await postgres.ensure_running()
    good = postgres.ADMIN_DSN.rsplit("@", 1)[1].split("/", 1)[0]
    url = (
        f"postgresql+asyncpg://postgres@/postgres?host=127.0.0.1:{silent.port}&host={good}"
        "&target_session_attrs=read-write&connect_timeout=0.5"
    )
    connector = PgConnector(url)
    for _ in range(3):
        conn = await connector.connect()
        try:
            assert await conn.fetchval("SELECT 1") == 1
        finally:
            await conn.close()
    assert silent.drain() == 1, "the hanging host was tried again after the good one answered"


async def test_a_standby_only_url_is_refused_naming_every_host(silent: SilentHost) -> None:
    async with pg_cluster(synchronous=False) as cluster:
        url = cluster.url(cluster.standby) + f"&host=127.0.0.1:{silent.port}&connect_timeout=0.3"
        with pytest.raises(ConnectionError) as refused:
            await PgConnector(url).connect()
        message = str(refused.value)
        assert f"127.0.0.1:{cluster.standby.port}: TargetServerAttributeNotMatched" in message
        assert f"127.0.0.1:{silent.port}: TimeoutError" in message
