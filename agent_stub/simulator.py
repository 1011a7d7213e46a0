"""A fleet of simulated nodes, each the real `Agent` over real gRPC.

Every node runs the agent's own watch loop, registration, token handling, heartbeats and
status reports against the control plane; only applying a bundle is simulated: the
archive is downloaded and its digest checked (optional), then a configurable delay
stands for the proxy reload, and a configurable share of applies fail (a NACK). Each
node reports synthetic heartbeat metrics chosen by the bundle it runs, so a canary can
be made bad on purpose: give the new bundle a high error rate.

Many nodes share a few channels (one HTTP/2 connection each). A thin channel wrapper
records each node's `DesiredState` events as they arrive — digest, traffic weight and
when — so tests and benchmarks can see what the watch told every node.

    sim = FleetSimulator(FleetConfig(server, project, token, nodes=200, labels={"env": "prod"}))
    await sim.start()
    await sim.wait_registered()
    ...  # roll out, watch `sim.summary()`
    await sim.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import grpc

from agent_stub.agent import Agent
from agent_stub.applier import Downloaded, Target
from agent_stub.backoff import BackoffPolicy
from agent_stub.config import AgentConfig
from agent_stub.errors import ApplyFailed, TransientFailure
from agent_stub.heartbeat import HEALTH, METRIC_BOUNDS
from agent_stub.rpc import CHANNEL_OPTIONS
from agent_stub.state import MemoryStateStore
from controlplane.api.bundle.v1 import bundle_pb2, bundle_pb2_grpc
from controlplane.api.node.v1 import node_pb2
from controlplane.api.watch.v1 import watch_pb2
from controlplane.proxies.routes import Table

WATCH_METHOD = "/controlplane.watch.v1.WatchService/WatchBundles"
# Streams per HTTP/2 connection: well under the usual 100-stream server default, so no
# call ever queues behind a connection's stream limit.
NODES_PER_CHANNEL = 50


@dataclass(frozen=True)
class MetricsProfile:
    """Synthetic heartbeat metrics; `noise` is the relative jitter of each value. A value
    of None is not reported at all (health None: UNSPECIFIED), as from a node whose
    metrics are broken: `MetricsProfile.silent()` reports nothing, so gates fail on it."""

    health: str | None = "healthy"
    error_rate: float | None = 0.005
    p99_latency_ms: float | None = 40.0
    cpu_percent: float | None = 20.0
    memory_percent: float | None = 40.0
    requests_per_second: float | None = 100.0
    noise: float = 0.1

    @classmethod
    def silent(cls) -> MetricsProfile:
        """No health and no metric: what an agent without a metrics source sends."""
        return cls(None, None, None, None, None, None)

    @classmethod
    def parse(cls, text: str, base: MetricsProfile | None = None) -> MetricsProfile:
        """`error_rate=0.3,p99_latency_ms=900,health=degraded` on top of `base`; a value
        of `none` omits that metric (or health) from the heartbeats."""
        values: dict[str, Any] = {}
        for item in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = item.partition("=")
            key = {
                "p99": "p99_latency_ms",
                "cpu": "cpu_percent",
                "memory": "memory_percent",
                "rps": "requests_per_second",
            }.get(key.strip(), key.strip())
            if not sep or key not in cls.__dataclass_fields__:
                raise ValueError(
                    f"{item!r}: expected one of {', '.join(cls.__dataclass_fields__)} as name=value"
                )
            value = value.strip()
            if value.lower() == "none" and key != "noise":
                values[key] = None
            elif key == "health":
                if value not in HEALTH:
                    raise ValueError(f"{item!r}: health is one of {', '.join(HEALTH)} or none")
                values[key] = value
            else:
                values[key] = float(value)
        return replace(base or cls(), **values)

    def sample(self, rng: random.Random) -> node_pb2.NodeMetrics:
        def jitter(value: float, low: float, high: float) -> float:
            return min(high, max(low, value * (1 + rng.uniform(-self.noise, self.noise))))

        # Within the bounds the server accepts, so noise never gets a beat refused.
        values = {
            name: jitter(value, low, high)
            for name, (low, high) in METRIC_BOUNDS.items()
            if (value := getattr(self, name)) is not None
        }
        health = node_pb2.HEALTH_STATUS_UNSPECIFIED if self.health is None else HEALTH[self.health]
        return node_pb2.NodeMetrics(health=health, **values)


@dataclass
class FleetConfig:
    server: str
    project: str
    token: str
    nodes: int = 10
    labels: dict[str, str] = field(default_factory=dict)
    name_prefix: str = "sim"
    # Share of applies that fail (NACK), drawn per apply.
    failure_rate: float = 0.0
    # Seconds an apply takes, +/- `apply_jitter` of it.
    apply_delay: float = 0.0
    apply_jitter: float = 0.2
    # Download the archive and check its digest before "applying".
    download: bool = True
    metrics: MetricsProfile = field(default_factory=MetricsProfile)
    # Metrics of nodes running a bundle whose digest starts with the key.
    bundle_metrics: dict[str, MetricsProfile] = field(default_factory=dict)
    # Bundles (digest prefixes) every node rejects.
    fail_bundles: set[str] = field(default_factory=set)
    # Until the server's first Heartbeat reply names the interval.
    heartbeat_interval: float = 10.0
    liveness_timeout: float = 45.0
    # Unary call deadline; raise it when the server is slow to enroll a big fleet (a
    # registration whose answer is lost leaves the name held by a credential never seen).
    rpc_timeout: float = 10.0
    backoff: BackoffPolicy = field(default_factory=BackoffPolicy)
    channels: int = 0
    # Nodes started per second (0: all at once). A fleet booting together is a real
    # scenario, but a benchmark of something else should not measure that storm.
    ramp: float = 0.0
    seed: int | None = None
    # Agent log lines below this level are dropped: a thousand agents at INFO is noise.
    log_level: int = logging.WARNING
    # Extra metadata for the shared channels' calls (none needed normally).
    channel_options: tuple[tuple[str, Any], ...] = ()
    # Register addresses for routers: node i at 127.0.0.1:(address_port + i); 0: none.
    address_port: int = 0


@dataclass
class Observed:
    """What the watch told a node, and when (wall clock, seconds since the epoch, so it
    compares with the server's timestamps on the same machine)."""

    digest: str
    traffic_weight: int
    revision: int
    at: float


class SimNode:
    """One simulated node: an Agent, its in-memory state and its simulated proxy."""

    def __init__(self, sim: FleetSimulator, index: int):
        self.sim = sim
        self.index = index
        self.name = f"{sim.config.name_prefix}-{index:04d}"
        self.state = MemoryStateStore()
        self.digest = ""
        self.applies = 0
        self.failures = 0
        self.applying = False
        # digest -> (desired state received, apply finished), wall clock seconds.
        self.timings: dict[str, tuple[float, float]] = {}
        self.observed: list[Observed] = []
        # Bundles (digest prefixes) this node alone rejects.
        self.rejects: set[str] = set()
        # A router: the routing table it runs, and a reason to refuse tables ("": none).
        self.routes: Table | None = None
        self.refuse_routes = ""
        self.agent: Agent | None = None
        self.task: asyncio.Task[None] | None = None

    @property
    def node_id(self) -> str:
        return self.agent.node_id if self.agent is not None else ""

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    @property
    def traffic_weight(self) -> int | None:
        return self.observed[-1].traffic_weight if self.observed else None

    # -- Installer ------------------------------------------------------------------

    def active_digest(self) -> str:
        return self.digest

    async def install(self, target: Target, node_id: str, downloaded: Downloaded) -> None:
        cfg, rng = self.sim.config, self.sim.rng
        received = self._received(target.digest)
        self.applying = True
        try:
            if cfg.download:
                await self._fetch(target.digest)
            await downloaded()
            delay = cfg.apply_delay * (1 + rng.uniform(-cfg.apply_jitter, cfg.apply_jitter))
            if delay > 0:
                await asyncio.sleep(delay)
            if _matches(target.digest, cfg.fail_bundles | self.rejects):
                self.failures += 1
                raise ApplyFailed(f"simulated: {self.name} rejects {target.digest}")
            if rng.random() < cfg.failure_rate:
                self.failures += 1
                raise ApplyFailed(f"simulated: reload of {target.digest} failed on {self.name}")
            self.digest = target.digest
            self.applies += 1
            self.timings[target.digest] = (received, time.time())
        finally:
            self.applying = False

    async def reweight(self, target: Target, node_id: str) -> None:
        """Simulated proxies take any weight; the watch history records what arrived."""

    async def route(self, table: Table | None) -> None:
        """A simulated router takes any routing table unless told to refuse them."""
        if table is not None and self.refuse_routes:
            raise ApplyFailed(f"simulated: {self.name} refuses routing tables: {self.refuse_routes}")
        self.routes = table

    def _received(self, digest: str) -> float:
        for seen in reversed(self.observed):
            if seen.digest == digest:
                return seen.at
        return time.time()

    async def _fetch(self, digest: str) -> None:
        assert self.agent is not None
        stub = bundle_pb2_grpc.BundleServiceStub(self.sim.channel_for(self.index))
        hasher = hashlib.sha256()
        try:
            async for chunk in stub.DownloadBundle(
                bundle_pb2.DownloadBundleRequest(project=self.sim.config.project, digest=digest),
                metadata=self.agent.metadata(),
                timeout=60,
            ):
                hasher.update(chunk.chunk)
        except grpc.RpcError as e:
            if e.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED):
                raise ApplyFailed(f"download refused: {e.code().name}") from None
            raise TransientFailure(f"download failed: {e.code().name}") from None
        if f"sha256:{hasher.hexdigest()}" != digest:
            raise ApplyFailed(f"downloaded bytes do not match {digest}")

    async def metrics(self) -> node_pb2.NodeMetrics:
        return self.sim.profile_for(self.digest).sample(self.sim.rng)


class FleetSimulator:
    def __init__(self, config: FleetConfig):
        self.config = config
        self.rng = random.Random(config.seed)
        self.nodes = [SimNode(self, i) for i in range(config.nodes)]
        self._channels: list[Any] = []
        self._by_node_id: dict[str, SimNode] = {}
        self.log = logging.getLogger("agent_stub.simulator")
        self._agent_log = logging.getLogger("agent_stub.sim.agents")
        self._agent_log.setLevel(config.log_level)

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        count = self.config.channels or max(1, math.ceil(len(self.nodes) / NODES_PER_CHANNEL))
        for i in range(count):
            options = [
                *CHANNEL_OPTIONS,
                # One connection per channel: grpc would otherwise share one between
                # channels with equal arguments.
                ("grpc.use_local_subchannel_pool", 1),
                ("agent_stub.sim.channel", i),
                *self.config.channel_options,
            ]
            self._channels.append(
                _TapChannel(grpc.aio.insecure_channel(self.config.server, options=options), self)
            )
        for node in self.nodes:
            self.start_node(node.index)
            if self.config.ramp > 0:
                await asyncio.sleep(1 / self.config.ramp)

    async def stop(self) -> None:
        await asyncio.gather(*(self.stop_node(n.index) for n in self.nodes))
        for channel in self._channels:
            await channel.close()
        self._channels = []

    def channel_for(self, index: int) -> Any:
        return self._channels[index % len(self._channels)]

    def start_node(self, index: int) -> None:
        """Start (or restart, keeping its identity and bundle) node `index`."""
        node = self.nodes[index]
        if node.running:
            return
        cfg = self.config
        agent_config = AgentConfig(
            server=cfg.server,
            project=cfg.project,
            token=cfg.token,
            labels=dict(cfg.labels),
            name=node.name,
            heartbeat_interval=cfg.heartbeat_interval,
            liveness_timeout=cfg.liveness_timeout,
            rpc_timeout=cfg.rpc_timeout,
            backoff=cfg.backoff,
            fsync=False,
            hostname=f"{node.name}.sim",
            address=f"127.0.0.1:{cfg.address_port + index}" if cfg.address_port else "",
        )
        node.agent = Agent(
            agent_config,
            channel=self.channel_for(index),
            state=node.state,
            installer=node,
            metrics=node.metrics,
            logger=self._agent_log,
            rng=self.rng.random,
        )
        node.task = asyncio.get_running_loop().create_task(node.agent.run(), name=node.name)

    async def stop_node(self, index: int) -> None:
        """Stop node `index` as if its host went down: heartbeats stop, it goes offline."""
        node = self.nodes[index]
        if node.agent is not None and node.task is not None:
            node.agent.stop()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await node.task
        node.task = None

    async def wait_registered(self, within: float = 60.0) -> list[str]:
        """Node ids once every running node has registered and opened its stream."""
        deadline = time.monotonic() + within
        while True:
            pending = [
                n
                for n in self.nodes
                if n.running and (not n.node_id or n.agent is None or not n.agent.connected.is_set())
            ]
            if not pending:
                for n in self.nodes:
                    self._by_node_id[n.node_id] = n
                return [n.node_id for n in self.nodes]
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(pending)} simulated node(s) not connected after {within}s")
            await asyncio.sleep(0.05)

    # -- knobs -------------------------------------------------------------------------

    def profile_for(self, digest: str) -> MetricsProfile:
        for prefix, profile in self.config.bundle_metrics.items():
            if _matches(digest, (prefix,)):
                return profile
        return self.config.metrics

    def set_bundle_metrics(self, digest_prefix: str, profile: MetricsProfile) -> None:
        self.config.bundle_metrics[digest_prefix] = profile

    def by_node_id(self, node_id: str) -> SimNode:
        if node_id not in self._by_node_id:
            self._by_node_id = {n.node_id: n for n in self.nodes if n.node_id}
        return self._by_node_id[node_id]

    def observe(self, node_id: str, desired: watch_pb2.DesiredState) -> None:
        node = self._by_node_id.get(node_id)
        if node is None:
            self._by_node_id = {n.node_id: n for n in self.nodes if n.node_id}
            node = self._by_node_id.get(node_id)
        if node is not None:
            node.observed.append(
                Observed(desired.digest, desired.traffic_weight, desired.revision, time.time())
            )

    # -- looking at it -----------------------------------------------------------------

    def summary(self) -> FleetSummary:
        running = [n for n in self.nodes if n.running]
        return FleetSummary(
            nodes=len(self.nodes),
            running=len(running),
            connected=sum(1 for n in running if n.agent is not None and n.agent.connected.is_set()),
            applying=sum(1 for n in running if n.applying),
            bundles=dict(Counter(n.digest for n in self.nodes if n.digest)),
            applies=sum(n.applies for n in self.nodes),
            failures=sum(n.failures for n in self.nodes),
        )


@dataclass(frozen=True)
class FleetSummary:
    nodes: int
    running: int
    connected: int
    applying: int
    bundles: Mapping[str, int]
    applies: int
    failures: int

    def line(self) -> str:
        bundles = ", ".join(
            f"{d.removeprefix('sha256:')[:12]} {n}"
            for d, n in sorted(self.bundles.items(), key=lambda x: -x[1])
        )
        return (
            f"nodes {self.nodes} running {self.running} connected {self.connected} applying {self.applying} "
            f"applied {self.applies} failed {self.failures} | {bundles or 'no bundle'}"
        )


def _matches(digest: str, prefixes: Collection[str]) -> bool:
    """`digest` starts with one of `prefixes` (with or without `sha256:`)."""
    bare = digest.removeprefix("sha256:")
    return bool(digest) and any(p and (digest.startswith(p) or bare.startswith(p)) for p in prefixes)


class _TapChannel:
    """A channel that lets every call through and notes each node's DesiredState."""

    def __init__(self, channel: Any, sim: FleetSimulator):
        self._channel = channel
        self._sim = sim

    def __getattr__(self, name: str) -> Any:
        return getattr(self._channel, name)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        inner = self._channel.unary_stream(method, *args, **kwargs)
        if method != WATCH_METHOD:
            return inner
        sim = self._sim

        def call(request: watch_pb2.WatchBundlesRequest, **call_kwargs: Any) -> _TapCall:
            return _TapCall(inner(request, **call_kwargs), request.node_id, sim.observe)

        return call


class _TapCall:
    def __init__(self, call: Any, node_id: str, observe: Callable[[str, watch_pb2.DesiredState], None]):
        self._call = call
        self._node_id = node_id
        self._observe = observe

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)

    async def read(self) -> Any:
        response = await self._call.read()
        if isinstance(response, watch_pb2.WatchBundlesResponse):
            for event in response.events:
                if event.WhichOneof("event") == "desired":
                    self._observe(self._node_id, event.desired)
        return response
