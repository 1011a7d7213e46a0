"""Envoy's aggregated discovery service and metrics sink: the grpc side only.

`AggregatedDiscoveryService` (state of the world and delta) authenticates the stream,
opens the node's feed of targets and runs a `controlplane.xds` session over it: every
request, new target and tick goes through the session, whose responses are written as
they come (pre-encoded bytes: the method is registered without a serializer, as
WatchBundles is). `MetricsService/StreamMetrics` turns each flush into heartbeat figures.
The feed, the authentication and where statuses and heartbeats go are seams, so the
same code runs on the watch hub or, in tests, on a static set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import grpc
from envoy.service.discovery.v3 import ads_pb2, discovery_pb2
from prometheus_client import Counter, Gauge

from controlplane.api.third_party.envoy.service.metrics.v3 import metrics_service_pb2 as metrics_pb
from controlplane.domain.kernel.errors import DomainError, PermissionDenied, Unauthenticated
from controlplane.domain.model.fleet import Node, NodeMetrics
from controlplane.rpc import auth
from controlplane.rpc.errors import set_status
from controlplane.xds.delta import DeltaSession
from controlplane.xds.encode import Encoder
from controlplane.xds.session import Limits, Output, Session
from controlplane.xds.snapshot import Snapshot
from controlplane.xds.sotw import SotwSession
from controlplane.xds.stats import NodeStats
from controlplane.xds.status import NodeXdsStatus

log = logging.getLogger(__name__)

ADS_SERVICE = ads_pb2.DESCRIPTOR.services_by_name["AggregatedDiscoveryService"].full_name
METRICS_SERVICE = metrics_pb.DESCRIPTOR.services_by_name["MetricsService"].full_name
SERVICES = (ADS_SERVICE, METRICS_SERVICE)
# livesum: with `serve --workers`, the server's streams, whichever process holds them.
STREAMS_OPEN = Gauge(
    "controlplane_xds_streams_open", "Open aggregated discovery (ADS) streams.", multiprocess_mode="livesum"
)
RESOURCES_SENT = Counter(
    "controlplane_xds_resources_sent_total",
    "Resources sent over ADS; a node that resumes with what it has adds nothing.",
)

# A session's gate timeout is checked this often (it is 15 s): a second is plenty. Only
# a session waiting on a stage is ticked (`Session.staging`).
TICK_SECONDS = 1.0


class Feed(Protocol):
    """One node's targets: the current one, the one it last ran whole, then each new one."""

    @property
    def target(self) -> Snapshot: ...

    @property
    def base(self) -> Snapshot | None: ...

    async def next(self) -> Snapshot | DomainError | None:
        """The next target; else why the stream must end (None: the node was revoked)."""
        ...

    async def report(self, status: NodeXdsStatus) -> None:
        """The node's status changed (what it acknowledged or refused)."""
        ...

    def close(self) -> None: ...


class Feeds(Protocol):
    async def open(self, node_id: str, node: Node | None = None) -> Feed:
        """The node's feed; `node`: its record, when authentication read it already."""
        ...


# The node a call authenticates as, from its metadata or peer certificate.
Authenticate = Callable[[grpc.aio.ServicerContext], Awaitable[str]]


async def authenticated_node(context: grpc.aio.ServicerContext) -> str:
    """The node the interceptor authenticated (rule NODE_STREAM: its credential, token or
    node certificate)."""
    identity = auth.current()
    if identity.kind is not auth.Kind.NODE:
        raise Unauthenticated(
            "an xDS stream needs the node's credential (authorization: Bearer <credential>) "
            "or a node certificate"
        )
    return identity.subject


OnStatus = Callable[[str, NodeXdsStatus], Awaitable[None]]
OnMetrics = Callable[[str, NodeMetrics], Awaitable[None]]


class AdsServicer:
    def __init__(
        self,
        feeds: Feeds,
        authenticate: Authenticate = authenticated_node,
        on_status: OnStatus | None = None,
        encoder: Encoder | None = None,
        limits: Limits | None = None,
    ):
        self._feeds = feeds
        self._authenticate = authenticate
        self._on_status = on_status
        self.encoder = encoder or Encoder()
        self._limits = limits
        # Sessions of open streams, by node: tests and GetNode look at them.
        self.sessions: dict[str, Session] = {}

    async def StreamAggregatedResources(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> None:
        await self._serve(SotwSession, requests, context)

    async def DeltaAggregatedResources(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> None:
        await self._serve(DeltaSession, requests, context)

    async def _serve(
        self, cls: type[Session], requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> None:
        try:
            node_id = await self._authenticate(context)
            feed = await self._feeds.open(node_id, auth.take_node(node_id))
        except DomainError as e:
            set_status(context, e)
            return
        session = cls(node_id, feed.target, base=feed.base, encoder=self.encoder, limits=self._limits)
        session.alias = auth.current().alias
        self.sessions[node_id] = session
        STREAMS_OPEN.inc()
        stream = _Stream(session, feed, context, self._on_status)
        try:
            error = await stream.run(requests)
            if isinstance(error, DomainError):
                set_status(context, error)
            elif error is not None:
                # The call went away (the client hung up): nothing to report to it.
                log.debug("xDS stream of %s ended: %r", node_id, error)
        finally:
            feed.close()
            STREAMS_OPEN.dec()
            if self.sessions.get(node_id) is session:
                del self.sessions[node_id]


class _Stream:
    """One ADS stream's running parts: a task reading requests, a task following the
    feed, and a tick task only while the session waits on a stage. An object with slots
    rather than closures: 10,000 idle streams hold one each."""

    __slots__ = ("context", "ended", "feed", "lock", "on_status", "sent", "session", "ticks")

    def __init__(
        self, session: Session, feed: Feed, context: grpc.aio.ServicerContext, on_status: OnStatus | None
    ):
        self.session = session
        self.feed = feed
        self.context = context
        self.on_status = on_status
        self.lock = asyncio.Lock()
        self.sent = 0
        # The gate timeout's ticks, only while the session waits on a stage (the only
        # time a tick can change anything): an idle stream has no timer and no task.
        self.ticks: asyncio.Task[None] | None = None
        # The first of the stream's tasks to end (a tick task only when it fails).
        self.ended: asyncio.Future[asyncio.Task[Any]] = asyncio.get_running_loop().create_future()

    async def run(self, requests: AsyncIterator[Any]) -> BaseException | DomainError | None:
        """Until the client goes, the feed ends or a request is refused: why."""
        tasks = [asyncio.create_task(self._read(requests)), asyncio.create_task(self._follow())]
        for task in tasks:
            task.add_done_callback(self._end)
        try:
            first = await self.ended
            return first.exception() if first.exception() is not None else first.result()
        finally:
            if self.ticks is not None:
                tasks.append(self.ticks)
            for task in tasks:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*tasks, return_exceptions=True)

    def _end(self, task: asyncio.Task[Any]) -> None:
        if not self.ended.done():
            self.ended.set_result(task)

    def _ticks_ended(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._end(task)
        elif self.ticks is task:
            self.ticks = None  # a done task keeps its coroutine: let both go

    async def _emit(self, out: Output) -> None:
        session = self.session
        for payload in out.sends:
            await self.context.write(payload)
        RESOURCES_SENT.inc(session.resources_sent - self.sent)
        self.sent = session.resources_sent
        if session.staging and (self.ticks is None or self.ticks.done()):
            self.ticks = asyncio.create_task(self._tick())
            self.ticks.add_done_callback(self._ticks_ended)
        if out.status is not None:
            await self.feed.report(out.status)
            if self.on_status is not None:
                await self.on_status(session.node_id, out.status)

    async def _follow(self) -> DomainError | None:
        while isinstance(target := await self.feed.next(), Snapshot):
            async with self.lock:
                await self._emit(self.session.set_target(target))
        return target or Unauthenticated("this node's identity was revoked")

    async def _read(self, requests: AsyncIterator[Any]) -> DomainError | None:
        async for request in requests:
            async with self.lock:
                await self._emit(self.session.receive(request))
        return None

    async def _tick(self) -> None:
        """Tick the session once a second while it waits on a stage; then end (`_emit`
        starts another when a request or a new target opens a stage again)."""
        while True:
            await asyncio.sleep(TICK_SECONDS)
            if not self.session.staging:
                return
            async with self.lock:
                await self._emit(self.session.tick())


class MetricsServicer:
    """Envoy's stats sink: each flush becomes the node's heartbeat figures."""

    def __init__(
        self,
        on_metrics: OnMetrics,
        authenticate: Authenticate = authenticated_node,
        clock: Callable[[], float] = time.time,
    ):
        self._authenticate = authenticate
        self._on_metrics = on_metrics
        self._clock = clock

    async def StreamMetrics(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        try:
            node_id = await self._authenticate(context)
            # The node's record its authentication read is not needed here: taken, so
            # the identity this stream keeps for its life holds no copy of it.
            auth.take_node(node_id)
            stats = NodeStats()
            first = True
            async for message in requests:
                if first:
                    claimed = message.identifier.node.id
                    if claimed and claimed not in (node_id, auth.current().alias or node_id):
                        raise PermissionDenied(
                            f"metrics of node {claimed[:128]!r} on node {node_id!r}'s stream"
                        )
                    first = False
                await self._on_metrics(node_id, stats.observe(message, self._clock()))
        except DomainError as e:
            set_status(context, e)
        return metrics_pb.StreamMetricsResponse()


def handlers(ads: AdsServicer | None, metrics: MetricsServicer | None) -> list[grpc.GenericRpcHandler]:
    out: list[grpc.GenericRpcHandler] = []
    if ads is not None:
        out.append(
            grpc.method_handlers_generic_handler(
                ADS_SERVICE,
                {
                    "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                        ads.StreamAggregatedResources,
                        request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
                        response_serializer=None,
                    ),
                    "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
                        ads.DeltaAggregatedResources,
                        request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
                        response_serializer=None,
                    ),
                },
            )
        )
    if metrics is not None:
        out.append(
            grpc.method_handlers_generic_handler(
                METRICS_SERVICE,
                {
                    "StreamMetrics": grpc.stream_unary_rpc_method_handler(
                        metrics.StreamMetrics,
                        request_deserializer=metrics_pb.StreamMetricsMessage.FromString,
                        response_serializer=metrics_pb.StreamMetricsResponse.SerializeToString,
                    )
                },
            )
        )
    return out
