"""The composition root: builds engine → store → hub → domain → servicers, and owns the
start and stop order. Nothing else creates engines, sessions or servers."""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

from prometheus_client import disable_created_metrics, start_http_server

from controlplane import firststart
from controlplane.blobs.local import LocalBlobStore
from controlplane.blobs.s3 import S3BlobStore, S3Settings
from controlplane.blobs.traced import TracedBlobStore
from controlplane.config import Settings
from controlplane.domain.audit.context import acting_as, system
from controlplane.domain.audit.trail import AuditTrail
from controlplane.domain.audit.trail import seal as seal_audit_head
from controlplane.domain.bundles.archive.kdl_pool import KdlLimits, KdlParsers
from controlplane.domain.bundles.gc import BlobCollector
from controlplane.domain.bundles.keys import KeyDirectory
from controlplane.domain.bundles.lifecycle import BundleLifecycle
from controlplane.domain.bundles.proxy_validators import ProxyBinaries
from controlplane.domain.bundles.registry import PIPELINE_SLOTS, BundleRegistry
from controlplane.domain.drift import DriftDetector
from controlplane.domain.fleet.assignments import DesiredStateWriter
from controlplane.domain.fleet.nodes import NodeRegistry
from controlplane.domain.identity.api_keys import ApiKeyRegistry
from controlplane.domain.identity.enrollment import EnrollmentTokens
from controlplane.domain.identity.node_credentials import NodeCredentials, load_revocations
from controlplane.domain.identity.node_tokens import (
    NodeRevocations,
    NodeTokens,
    RevocationTap,
)
from controlplane.domain.kernel import observe
from controlplane.domain.kernel.addresses import parse_allow
from controlplane.domain.kernel.clock import utcnow
from controlplane.domain.kernel.errors import NotFound
from controlplane.domain.kernel.wakeup import Wakeup
from controlplane.domain.leases import Leases
from controlplane.domain.notify.audit_watch import AuditWatch
from controlplane.domain.notify.channels import NotificationDirectory
from controlplane.domain.notify.worker import NotificationWorker
from controlplane.domain.ports import BlobStore, Clock
from controlplane.domain.projects import ProjectDirectory
from controlplane.domain.rollouts.bus import RolloutBus
from controlplane.domain.rollouts.controller import RolloutController
from controlplane.domain.rollouts.directory import RolloutDirectory
from controlplane.domain.rollouts.driver import RolloutDriver
from controlplane.domain.routing.directory import RouterDirectory
from controlplane.domain.routing.follow import RouteFollower
from controlplane.outbound.http import OutboundHttp
from controlplane.outbound.notify import HttpNotificationSender, HttpWebhookCaller
from controlplane.outbound.prometheus import PrometheusProvider
from controlplane.rpc.audit import AuditServicer
from controlplane.rpc.authn import Authenticator, NodeCertificates
from controlplane.rpc.bundles import BundleServicer
from controlplane.rpc.http_sd import HttpServiceDiscovery
from controlplane.rpc.identity import IdentityServicer
from controlplane.rpc.interceptor import GuardInterceptor
from controlplane.rpc.nodes import NodeServicer
from controlplane.rpc.notify import NotificationServicer
from controlplane.rpc.projects import ProjectServicer
from controlplane.rpc.ratelimit import RateLimiter
from controlplane.rpc.rollouts import DriftServicer, RolloutServicer
from controlplane.rpc.scope import CachedResolver, ScopeFinder
from controlplane.rpc.server import GrpcServer, ListenError
from controlplane.rpc.signing import SigningKeyServicer
from controlplane.rpc.watch import WatchServicer
from controlplane.rpc.xds_feed import HubFeeds
from controlplane.rpc.xds_feed import servicers as xds_servicers
from controlplane.store.engine import connections_in_use, make_engine, sqlite_directory, upgrade
from controlplane.store.feed import SqlChangeFeed
from controlplane.store.lease_keeper import PgLeaseKeeper
from controlplane.store.listen import PgListener
from controlplane.store.liveness import FileLiveness, holder_identity
from controlplane.store.peers import Peers
from controlplane.store.sql import SqlStore
from controlplane.tasks import fleet_metrics
from controlplane.tasks.bundle_gc import collect_bundles
from controlplane.tasks.fleet import sweep_offline
from controlplane.tasks.fleet_metrics import FleetMetrics
from controlplane.tasks.notify import NotificationTasks
from controlplane.tasks.notify import record_pass as record_notify_pass
from controlplane.tasks.periodic import Loop, Periodic
from controlplane.tasks.retention import Retention
from controlplane.tasks.rollouts import RolloutTasks, record_pass
from controlplane.watch import metrics as watch_metrics
from controlplane.watch.hub import WatchHub
from controlplane.xds.pipeline import XdsCheck

log = logging.getLogger(__name__)

METRICS_OPTION = "--metrics-listen / CONTROLPLANE_METRICS_LISTEN"
# How long a call waits for this process's hub to read a revision another serving process
# committed just before (as long as a stream waits for a revision its node has seen).
READ_YOUR_WRITES = 3.0
# Database connections a replica keeps (and as many again at peaks).
POOL_SIZE = 10


@dataclass
class StartInfo:
    port: int
    metrics_port: int
    enrollment_token: str | None
    token_created: bool
    # The first-start global admin API key, only on the start that created it.
    admin_key: str | None = None
    # The HTTP service-discovery port for Prometheus (0: off).
    http_sd_port: int = 0
    # A worker's own gRPC port besides the shared one (serve --workers; 0: none).
    private_port: int = 0


@dataclass
class FirstStart:
    """What the first-start work made or found: printed once by `serve`."""

    enrollment_token: str | None
    token_created: bool
    admin_key: str | None


async def first_start(settings: Settings, clock: Clock = utcnow) -> FirstStart:
    """The work `serve --workers` does once, before any serving process starts: the data
    directory, the migrations, every key made on first start, the default project, the
    first admin API key and the trusted keys file. Each serving process then finds all of
    it in place (App.start repeats none of it)."""
    s = settings
    s.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(s.url, pool_size=2)
    try:
        await upgrade(engine)
        store = SqlStore(engine, firststart.audit_key(s), clock)
        await seal_audit_head(store)
        firststart.token_keyring(s)
        signing_keys = KeyDirectory(
            store, clock, firststart.signer(s), lambda: None, firststart.cross_signer(s)
        )
        with acting_as(system("signing-keys")):
            await signing_keys.register()
            await signing_keys.sign_unsigned()
        token, created = await firststart.enrollment_token(ProjectDirectory(store, clock), s.data_dir)
        admin_key = await firststart.admin_key(ApiKeyRegistry(store, clock), s.data_dir)
        firststart.write_trusted_keys(
            s.data_dir / firststart.TRUSTED_KEYS_FILE,
            await signing_keys.trusted(),
            signing_keys.signer.key_id,
        )
        return FirstStart(token, created, admin_key)
    finally:
        await engine.dispose()


class App:
    def __init__(self, settings: Settings, clock: Clock = utcnow):
        self.settings = settings
        # Every time-driven rule reads this clock (bakes, leases, offline detection,
        # retention, expiries): tests move it instead of waiting.
        self.clock = clock
        self._periodic: list[Periodic | Loop] = []
        self._listener: PgListener | None = None
        self._keeper: PgLeaseKeeper | None = None
        self._liveness: FileLiveness | None = None
        self._stopped = False
        self._metrics_server: Any = None
        self.http_sd: HttpServiceDiscovery | None = None
        self.peers: Peers | None = None

    async def start(self) -> StartInfo:
        """Open everything and serve. A start that fails part-way releases what it had
        opened (the database pool, the hub's task, the blob store's client, a bound port)
        before the error propagates, so a caller can retry in the same process."""
        async with contextlib.AsyncExitStack() as undo:
            info = await self._start(undo)
            undo.pop_all()
        return info

    async def _start(self, undo: contextlib.AsyncExitStack) -> StartInfo:
        s = self.settings
        s.data_dir.mkdir(parents=True, exist_ok=True)
        # Many long-lived stream objects: collect the youngest generation less often
        # (docs/benchmarks.md: the larger part of the GC saving).
        gc.set_threshold(50_000, 50, 1000)
        # Serving processes share one pool's worth of connections (at least 3 each), so
        # `--workers auto` on a many-core machine does not exhaust PostgreSQL's.
        self.engine = make_engine(s.url, pool_size=max(3, POOL_SIZE // max(1, s.workers)))
        undo.push_async_callback(self.engine.dispose)
        await upgrade(self.engine)
        audit_key = firststart.audit_key(s)
        self.store = SqlStore(self.engine, audit_key, self.clock)
        # Before anything reads or writes: verification passes from the first moment.
        await seal_audit_head(self.store)
        self.feed = SqlChangeFeed(self.store)
        # The hub's one read of the log also feeds node token revocation.
        self.revocations = NodeRevocations()
        self.hub = WatchHub(RevocationTap(self.feed, self.revocations), s.hub)
        await self.hub.start()
        undo.push_async_callback(self.hub.stop, 0.0)
        self._start_peers(undo)
        self.revocations.merge(await load_revocations(self.store))

        # Rung by whatever should make the rollout driver look now: a status report
        # (a step may be complete), an operator's change, another replica's NOTIFY.
        rollouts_due = Wakeup()
        self.projects = ProjectDirectory(self.store, self.clock)
        # Routing tables follow the reports of backends changing bundles.
        self.route_follower = RouteFollower(self.store, self.clock, self.hub.wake)
        self.routers = RouterDirectory(self.store, self.clock, self.hub.wake, self.hub)
        self.nodes = NodeRegistry(
            self.store,
            self.clock,
            view=self.hub,
            ledger=self.hub,
            notify=self.hub.wake,
            heartbeat_interval=s.heartbeat_interval,
            on_nack=watch_metrics.count_nack,
            on_report=rollouts_due,
            on_applied=self.route_follower.reported,
        )
        self.writer = DesiredStateWriter(self.store, self.clock, self.hub.wake, self.hub)
        await self._build_bundles(undo)
        self._build_rollouts(rollouts_due)
        token, created = await firststart.enrollment_token(self.projects, s.data_dir)
        self.api_keys = ApiKeyRegistry(self.store, self.clock)
        admin_key = await firststart.admin_key(self.api_keys, s.data_dir)
        self.enrollment = EnrollmentTokens(self.store, self.clock)
        self.credentials = NodeCredentials(self.store, self.clock, self.hub, self.hub.wake, self.revocations)
        self.tokens = NodeTokens(firststart.token_keyring(s), self.revocations, s.node_token_ttl)
        node_certificates = (
            NodeCertificates(s.tls_node_ca.read_bytes()) if s.tls_node_ca is not None else None
        )
        self.authenticator = Authenticator(
            self.api_keys,
            self.tokens,
            self.credentials,
            node_certificates=node_certificates,
            xds_contact=self.nodes.contact if s.xds_enrollment else None,
            xds_metadata_labels=s.xds_metadata_labels,
        )
        scopes = ScopeFinder({"node_id": CachedResolver(self._node_project), "key_id": self._key_projects})
        self.limiter = RateLimiter(s.rate_limits)
        with acting_as(system("signing-keys")):
            await self.signing_keys.register()
            await self.signing_keys.sign_unsigned()

        # Envoy nodes follow the same hub over ADS (rpc/xds_feed.py, docs/xds.md).
        self.xds_feeds = HubFeeds(self.hub, self.nodes, self.bundles, s.data_dir / "xds")
        self.grpc = GrpcServer(
            self._guard(scopes),
            NodeServicer(self.nodes, self.routers, self.xds_feeds.status_of),
            WatchServicer(self.hub, self.feed),
            BundleServicer(self.bundles, self.lifecycle, self.writer, self.xds_feeds.resources.compare),
            ProjectServicer(self.projects),
            max_pending=s.max_pending_requests,
            min_ping_interval_ms=int(s.min_client_ping_interval * 1000),
            identity=IdentityServicer(
                self.api_keys, self.enrollment, self.credentials, self.tokens, self.authenticator
            ),
            audit=AuditServicer(AuditTrail(self.store, audit_key)),
            signing=SigningKeyServicer(self.signing_keys),
            rollouts=RolloutServicer(self.rollout_directory, self.rollouts, self.rollout_bus),
            drift=DriftServicer(self.drift),
            notify=NotificationServicer(self.notifications),
            xds=xds_servicers(self.xds_feeds),
            reuse_port=s.workers > 1,
        )
        undo.push_async_callback(self.grpc.stop, 0.0)
        port = self._bind()
        metrics_port = self._start_metrics()
        undo.callback(self._stop_metrics)
        await self._start_liveness(undo)
        self._start_background(undo)
        await self.grpc.start()
        http_sd_port = await self._start_outbound(undo)
        return StartInfo(port, metrics_port, token, created, admin_key, http_sd_port, self.grpc.private_port)

    def _guard(self, scopes: ScopeFinder) -> GuardInterceptor:
        guard = GuardInterceptor(self.authenticator, scopes, self.limiter)
        if self.peers is not None:
            guard.barrier = self._barrier
        return guard

    def _bind(self) -> int:
        """The shared port, and a worker's private address too."""
        s = self.settings
        port = self.grpc.bind(s.listen, s.tls_cert, s.tls_key, s.tls_client_ca, s.tls_node_ca)
        if s.private_listen:
            self.grpc.bind(
                s.private_listen, s.tls_cert, s.tls_key, s.tls_client_ca, s.tls_node_ca, private=True
            )
        return port

    def _start_peers(self, undo: contextlib.AsyncExitStack) -> None:
        """With several serving processes, the others hear of every commit at once."""
        s = self.settings
        if s.workers <= 1:
            return
        self.peers = Peers(s.data_dir, s.process_index, s.workers, self._heard)
        self.peers.start()
        undo.callback(self.peers.stop)
        self.store.on_revision = self.peers.committed

    def _heard(self, revision: int) -> None:
        """Another serving process committed `revision`."""
        if revision > self.hub.position:
            self.hub.wake()

    def _barrier(self) -> Awaitable[None] | None:
        """Before a call: None if this hub has read everything any process of this
        machine committed, else the wait for it (rpc/interceptor.py)."""
        assert self.peers is not None
        heard = self.peers.head()
        if heard <= self.hub.position:
            return None
        return self._catch_up(heard)

    async def _catch_up(self, revision: int) -> None:
        # A database that cannot be read is the call's own problem to report.
        await self.hub.sync(revision, READ_YOUR_WRITES)

    async def _start_outbound(self, undo: contextlib.AsyncExitStack) -> int:
        """The outbound HTTP client's cleanup, and Prometheus's service discovery."""
        undo.push_async_callback(self.outbound.close)
        if not self.settings.http_sd_listen:
            return 0
        self.http_sd = HttpServiceDiscovery(self.nodes, self.authenticator)
        port = await self.http_sd.start(self.settings.http_sd_listen)
        undo.push_async_callback(self.http_sd.stop)
        return port

    async def _start_liveness(self, undo: contextlib.AsyncExitStack) -> None:
        """This process's liveness lock, and on PostgreSQL the keeper that renews its
        leases off the event loop (store/liveness.py, store/lease_keeper.py)."""
        s, holder = self.settings, self.leases.holder
        if s.embedded:
            self._liveness = FileLiveness(sqlite_directory(s.url) / "lease-holders")
            self._liveness.hold(holder)
            undo.callback(self._liveness.release, holder)
            self.store.holder_gone = self._liveness.gone
            return
        self._keeper = PgLeaseKeeper(s.url, holder, s.lease_ttl)
        await self._keeper.start()
        undo.push_async_callback(self._keeper.stop)
        self.leases.keeper = self._keeper

    def _start_background(self, undo: contextlib.AsyncExitStack) -> None:
        """NOTIFY listener (PostgreSQL), sweeps and the rollout driver."""
        s = self.settings
        if not s.embedded:
            # A report may reach this replica for a rollout another one leads.
            self._listener = PgListener(s.url, self.hub.wake, on_reports=self.driver.wakeup)
            self._listener.start()
            undo.push_async_callback(self._listener.stop)
        self._periodic = [
            Periodic(
                "offline-sweep",
                s.offline_sweep_interval.total_seconds(),
                lambda: sweep_offline(self.nodes, s.offline_after),
            ),
            Periodic("retention", s.prune_interval.total_seconds(), self.retention.run),
            Periodic("audit-verify", s.audit_verify_interval.total_seconds(), self.audit_watch.run_once),
            Periodic(
                "bundle-gc",
                s.bundle_gc_interval.total_seconds(),
                lambda: collect_bundles(self.blob_collector),
            ),
        ]
        # Fleet gauges: counted once across every process, by the lease's holder.
        self.fleet_metrics = FleetMetrics(self.store, self.leases)
        fleet_metrics.COLLECTOR.sources.append(self.fleet_metrics)
        undo.callback(self._forget_fleet_metrics)
        self._periodic.append(
            Periodic("fleet-metrics", s.fleet_metrics_interval.total_seconds(), self.fleet_metrics.run)
        )
        self._periodic.append(Loop("route-follower", self.route_follower.run))
        for job in self._periodic:
            job.start()
            undo.push_async_callback(job.stop)
        self.rollout_tasks.start()
        undo.push_async_callback(self.rollout_tasks.stop)
        self.notify_tasks.start()
        undo.push_async_callback(self.notify_tasks.stop)

    async def stop(self) -> None:
        """Health NOT_SERVING first, then streams end with a closing bookmark, then the
        server stops and the database is released. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        await self.grpc.drain()
        await self.hub.stop(self.settings.shutdown_grace)
        await self.grpc.stop(self.settings.shutdown_grace)
        await self.nodes.settle()  # batches whose callers were cancelled still commit
        self.kdl.close()  # after the server: pushes within the grace finish their parses
        await self.rollout_tasks.stop()  # hands its leases back
        await self.notify_tasks.stop()
        if self._keeper is not None:
            await self._keeper.stop()
        if self._liveness is not None:
            self._liveness.release(self.leases.holder)
        for job in self._periodic:
            await job.stop()
        await self.fleet_metrics.release()
        self._forget_fleet_metrics()
        if self._listener is not None:
            await self._listener.stop()
        if self.peers is not None:
            self.peers.stop()
        self._stop_metrics()
        if self.http_sd is not None:
            await self.http_sd.stop()
        await self.outbound.close()
        await self.blobs.close()
        if busy := connections_in_use(self.engine):
            log.warning("%d database connection(s) still in use at shutdown: they will not be closed", busy)
        await self.engine.dispose()

    async def _node_project(self, node_id: str) -> list[str] | None:
        try:
            return [(await self.nodes.get(node_id)).project]
        except NotFound:
            return None

    async def _key_projects(self, key_id: str) -> tuple[str, ...] | None:
        try:
            return (await self.api_keys.get(key_id)).projects()
        except NotFound:
            return None

    def _forget_fleet_metrics(self) -> None:
        with contextlib.suppress(ValueError):
            fleet_metrics.COLLECTOR.sources.remove(self.fleet_metrics)

    def _stop_metrics(self) -> None:
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None

    def _start_metrics(self) -> int:
        listen = self.settings.metrics_listen
        if not listen:
            return 0
        host, _, port = listen.rpartition(":")
        # `*_created` doubles every counter's series for a timestamp nobody alerts on.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        try:
            self._metrics_server, _thread = start_http_server(int(port), addr=host or "0.0.0.0")
        except (OSError, ValueError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise ListenError("serve metrics", listen, METRICS_OPTION, reason.lower()) from e
        return int(self._metrics_server.server_port)

    async def _build_bundles(self, undo: contextlib.AsyncExitStack) -> None:
        s = self.settings
        self.blobs = await _blob_store(s)
        undo.push_async_callback(self.blobs.close)
        signer = firststart.signer(s)
        self.signing_keys = KeyDirectory(
            self.store, self.clock, signer, self.hub.wake, firststart.cross_signer(s)
        )
        allowed = frozenset(s.validator_allow)
        # Scratch trees are cleaned at start: each serving process cleans only its own.
        staging = s.data_dir / "staging"
        if s.workers > 1:
            staging = staging / f"worker-{s.process_index}"
        proxy_binaries = ProxyBinaries(dict(s.validator_binaries), allowed)
        # KDL is parsed in worker processes (ckdl holds the GIL), started on first use:
        # one per pipeline slot, so every bundle being validated has its own.
        self.kdl = KdlParsers(KdlLimits(workers=PIPELINE_SLOTS))
        undo.callback(self.kdl.close)
        self.bundles = BundleRegistry(
            self.store,
            self.blobs,
            self.clock,
            staging_dir=staging,
            signer=signer,
            allowed_programs=allowed,
            proxy_binaries=proxy_binaries,
            max_bundle_bytes=s.max_bundle_bytes,
            kdl=self.kdl,
            # Bundles of Envoy resources are checked at push (docs/xds.md).
            content_checks=(XdsCheck(),),
        )
        self.bundles.clean_staging()
        self.lifecycle = BundleLifecycle(
            self.store, self.blobs, self.clock, self.hub, staging, allowed, proxy_binaries
        )
        self.blob_collector = BlobCollector(self.store, self.blobs, self.clock, s.bundle_retention)

    def _build_rollouts(self, rollouts_due: Wakeup) -> None:
        s = self.settings
        allow = parse_allow(s.outbound_allow)
        self.outbound = OutboundHttp(allow)
        self.rollout_bus = RolloutBus()
        holder = holder_identity(s.replica_id, s.process_index)
        self.leases = Leases(self.store, self.clock, ttl=s.lease_ttl, holder=holder)
        # Gates call a heartbeat stale past --gate-stale-after (default: once the node
        # would be marked offline).
        self.rollouts = RolloutController(
            self.store,
            self.clock,
            self.hub,
            self.hub.wake,
            self.rollout_bus,
            rollouts_due,
            stale_after=s.gate_staleness,
            metrics=PrometheusProvider(self.outbound),
            webhooks=HttpWebhookCaller(self.outbound),
        )
        self.rollout_directory = RolloutDirectory(
            self.store, self.clock, self.hub, self.hub.wake, self.rollout_bus, rollouts_due, allow
        )
        self.driver = RolloutDriver(
            self.rollouts, self.leases, s.rollout_tick.total_seconds(), record_pass, wakeup=rollouts_due
        )
        self.drift = DriftDetector(self.store, self.clock, self.hub, self.hub.wake, grace=s.drift_grace)
        self.rollout_tasks = RolloutTasks(
            self.driver,
            self.store,
            self.rollout_bus,
            self.drift,
            self.leases,
            s.drift_interval.total_seconds(),
        )
        self.notify_worker = NotificationWorker(
            self.store,
            self.clock,
            self.leases,
            HttpNotificationSender(self.outbound, s.notify_timeout.total_seconds()),
            s.notify_interval.total_seconds(),
            record_notify_pass,
        )
        self.store.on_emit = self.notify_worker.wake
        self.notifications = NotificationDirectory(
            self.store, self.clock, parse_allow(s.outbound_allow), self.notify_worker.wake
        )
        self.notify_tasks = NotificationTasks(self.notify_worker)
        # The key as the store was given it (the file or --audit-key; reading is idempotent).
        self.audit_watch = AuditWatch(self.store, firststart.audit_key(s), self.leases, self.clock)
        self.retention = Retention(
            self.store, self.feed, self.leases, self.hub, s.retain_revisions, s.retain_for
        )


async def _blob_store(s: Settings) -> BlobStore:
    store = await _backend(s)
    if observe.tracing():
        return TracedBlobStore(store, "s3" if s.blob_store else "local")
    return store


async def _backend(s: Settings) -> BlobStore:
    if not s.blob_store:
        return LocalBlobStore(s.data_dir / "blobs")
    store = S3BlobStore(
        S3Settings.from_url(
            s.blob_store,
            endpoint_url=s.s3_endpoint_url,
            region=s.s3_region,
            access_key_id=s.s3_access_key_id,
            secret_access_key=s.s3_secret_access_key,
        )
    )
    await store.start()
    return store
