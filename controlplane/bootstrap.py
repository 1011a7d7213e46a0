"""The composition root: builds engine → store → hub → domain → servicers, and owns the
start and stop order. Nothing else creates engines, sessions or servers."""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import start_http_server

from controlplane.archives.kdl_pool import KdlLimits, KdlParsers
from controlplane.blobs.base import BlobStore
from controlplane.blobs.local import LocalBlobStore
from controlplane.blobs.s3 import S3BlobStore, S3Settings
from controlplane.config import Settings
from controlplane.domain import retention
from controlplane.domain.apikeys import ApiKeyRegistry
from controlplane.domain.assignments import DesiredStateWriter
from controlplane.domain.audit import acting_as, system
from controlplane.domain.audit import seal as seal_audit_head
from controlplane.domain.audit_trail import AuditTrail
from controlplane.domain.bundle_gc import BlobCollector
from controlplane.domain.bundle_lifecycle import BundleLifecycle
from controlplane.domain.bundles import PIPELINE_SLOTS, BundleRegistry
from controlplane.domain.clock import utcnow
from controlplane.domain.drift import DriftDetector
from controlplane.domain.enrollment import EnrollmentTokens
from controlplane.domain.errors import NotFound
from controlplane.domain.leases import Leases
from controlplane.domain.node_identity import NodeCredentials, load_revocations
from controlplane.domain.node_tokens import (
    NodeRevocations,
    NodeTokens,
    RevocationTap,
    TokenKeyring,
    generate_private_pem,
    load_private,
    load_public,
)
from controlplane.domain.nodes import NodeRegistry
from controlplane.domain.projects import DEFAULT_PROJECT, ProjectDirectory
from controlplane.domain.records import Node, StatusReport
from controlplane.domain.rollouts.bus import RolloutBus
from controlplane.domain.rollouts.controller import RolloutController
from controlplane.domain.rollouts.directory import RolloutDirectory
from controlplane.domain.rollouts.driver import RolloutDriver
from controlplane.domain.signing import Signer, parse_seed
from controlplane.domain.signing_keys import KeyDirectory
from controlplane.keyfiles import load_or_create_hex, write_private
from controlplane.rpc.audit import AuditServicer
from controlplane.rpc.authn import Authenticator
from controlplane.rpc.bundles import BundleServicer
from controlplane.rpc.identity import IdentityServicer
from controlplane.rpc.interceptor import GuardInterceptor
from controlplane.rpc.nodes import NodeServicer
from controlplane.rpc.projects import ProjectServicer
from controlplane.rpc.ratelimit import RateLimiter
from controlplane.rpc.rollouts import DriftServicer, RolloutServicer
from controlplane.rpc.scope import CachedResolver, ScopeFinder
from controlplane.rpc.server import GrpcServer
from controlplane.rpc.signing import SigningKeyServicer
from controlplane.rpc.watch import WatchServicer
from controlplane.store.engine import connections_in_use, make_engine, upgrade
from controlplane.store.feed import SqlChangeFeed
from controlplane.store.listen import PgListener
from controlplane.store.sql import SqlStore
from controlplane.tasks.bundle_gc import collect_bundles
from controlplane.tasks.periodic import Periodic
from controlplane.tasks.rollouts import RolloutTasks, record_pass
from controlplane.watch import metrics as watch_metrics
from controlplane.watch.hub import WatchHub

log = logging.getLogger(__name__)

TOKEN_FILE = "enrollment-token"
AUDIT_KEY_FILE = "audit-key"
ADMIN_KEY_FILE = "admin-key"
TOKEN_KEY_FILE = "token-signing-key.pem"
SIGNING_KEY_FILE = "signing-key"
# The lease under which one replica at a time prunes the desired-state log.
RETENTION_LEASE = "retention"


@dataclass
class StartInfo:
    port: int
    metrics_port: int
    enrollment_token: str | None
    token_created: bool
    # The first-start global admin API key, only on the start that created it.
    admin_key: str | None = None


class App:
    def __init__(self, settings: Settings):
        self.settings = settings
        self._periodic: list[Periodic] = []
        self._listener: PgListener | None = None
        self._stopped = False
        self._metrics_server: Any = None

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
        # (grpc-aio-limits.md §3: the larger part of the GC saving).
        gc.set_threshold(50_000, 50, 1000)
        self.engine = make_engine(s.url)
        undo.push_async_callback(self.engine.dispose)
        await upgrade(self.engine)
        audit_key = self._audit_key()
        self.store = SqlStore(self.engine, audit_key)
        # Before anything reads or writes: verification passes from the first moment.
        await seal_audit_head(self.store)
        self.feed = SqlChangeFeed(self.engine, s.epoch_follows_timeline)
        # The hub's one read of the log also feeds node token revocation.
        self.revocations = NodeRevocations()
        self.hub = WatchHub(RevocationTap(self.feed, self.revocations), s.hub)
        await self.hub.start()
        undo.push_async_callback(self.hub.stop, 0.0)
        self.revocations.merge(await load_revocations(self.store))

        self.projects = ProjectDirectory(self.store, utcnow)
        self.nodes = NodeRegistry(
            self.store,
            utcnow,
            view=self.hub,
            ledger=self.hub,
            notify=self.hub.wake,
            heartbeat_interval=s.heartbeat_interval,
            on_nack=self._on_nack,
        )
        self.writer = DesiredStateWriter(self.store, utcnow, self.hub.wake, self.hub)
        self.blobs = await _blob_store(s)
        undo.push_async_callback(self.blobs.close)
        signer = self._signer()
        self.signing_keys = KeyDirectory(self.store, utcnow, signer, self.hub.wake)
        allowed = frozenset(s.validator_allow)
        # KDL is parsed in worker processes (ckdl holds the GIL), started on first use:
        # one per pipeline slot, so every bundle being validated has its own.
        self.kdl = KdlParsers(KdlLimits(workers=PIPELINE_SLOTS))
        undo.callback(self.kdl.close)
        self.bundles = BundleRegistry(
            self.store,
            self.blobs,
            utcnow,
            staging_dir=s.data_dir / "staging",
            signer=signer,
            allowed_programs=allowed,
            max_bundle_bytes=s.max_bundle_bytes,
            kdl=self.kdl,
        )
        self.bundles.clean_staging()
        self.lifecycle = BundleLifecycle(
            self.store, self.blobs, utcnow, self.hub, s.data_dir / "staging", allowed
        )
        self.blob_collector = BlobCollector(self.store, self.blobs, utcnow, s.bundle_retention)
        self._build_rollouts()
        token, created = await self._enrollment_token()
        self.api_keys = ApiKeyRegistry(self.store, utcnow)
        admin_key = await self._admin_key()
        self.enrollment = EnrollmentTokens(self.store, utcnow)
        self.credentials = NodeCredentials(self.store, utcnow, self.hub, self.hub.wake, self.revocations)
        self.tokens = NodeTokens(self._token_keyring(), self.revocations, s.node_token_ttl)
        self.authenticator = Authenticator(self.api_keys, self.tokens, self.credentials)
        scopes = ScopeFinder({"node_id": CachedResolver(self._node_project), "key_id": self._key_projects})
        self.limiter = RateLimiter(s.rate_limits)
        with acting_as(system("signing-keys")):
            await self.signing_keys.register()
            await self.signing_keys.sign_unsigned()

        self.grpc = GrpcServer(
            GuardInterceptor(self.authenticator, scopes, self.limiter),
            NodeServicer(self.nodes),
            WatchServicer(self.hub, self.feed),
            BundleServicer(self.bundles, self.lifecycle, self.writer),
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
        )
        undo.push_async_callback(self.grpc.stop, 0.0)
        port = self.grpc.bind(s.listen, s.tls_cert, s.tls_key, s.tls_client_ca)
        metrics_port = self._start_metrics()
        undo.callback(self._stop_metrics)
        self._start_background(undo)
        await self.grpc.start()
        return StartInfo(port, metrics_port, token, created, admin_key)

    def _start_background(self, undo: contextlib.AsyncExitStack) -> None:
        """NOTIFY listener (PostgreSQL), sweeps and the rollout driver."""
        s = self.settings
        if not s.embedded:
            # A report may reach this replica for a rollout another one leads.
            self._listener = PgListener(s.url, self.hub.wake, on_reports=self.driver.wake)
            self._listener.start()
            undo.push_async_callback(self._listener.stop)
        self._periodic = [
            Periodic("offline-sweep", s.offline_sweep_interval.total_seconds(), self._sweep_offline),
            Periodic("retention", s.prune_interval.total_seconds(), self._prune),
            Periodic(
                "bundle-gc",
                s.bundle_gc_interval.total_seconds(),
                lambda: collect_bundles(self.blob_collector),
            ),
        ]
        for job in self._periodic:
            job.start()
            undo.push_async_callback(job.stop)
        self.rollout_tasks.start()
        undo.push_async_callback(self.rollout_tasks.stop)

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
        await self.rollout_tasks.stop()
        for job in self._periodic:
            await job.stop()
        if self._listener is not None:
            await self._listener.stop()
        self._stop_metrics()
        await self.blobs.close()
        if busy := connections_in_use(self.engine):
            log.warning("%d database connection(s) still in use at shutdown: they will not be closed", busy)
        await self.engine.dispose()

    def _audit_key(self) -> bytes:
        if self.settings.audit_key:
            return bytes.fromhex(self.settings.audit_key)
        key, created = load_or_create_hex(self.settings.data_dir / AUDIT_KEY_FILE)
        if created and not self.settings.embedded:
            log.warning(
                "generated an audit key in %s: every replica must use the same key "
                "(set CONTROLPLANE_AUDIT_KEY)",
                self.settings.data_dir / AUDIT_KEY_FILE,
            )
        return key

    def _signer(self) -> Signer:
        """The bundle signing key: configured (hex, or a file of it), else a key made in
        the data directory on first start."""
        s = self.settings
        if s.signing_key:
            return Signer.from_seed(parse_seed(s.signing_key))
        if s.signing_key_file is not None:
            return Signer.from_seed(parse_seed(s.signing_key_file.read_text()))
        seed, created = load_or_create_hex(s.data_dir / SIGNING_KEY_FILE)
        if created and not s.embedded:
            log.warning(
                "generated a bundle signing key in %s: give every replica the same key "
                "(CONTROLPLANE_SIGNING_KEY_FILE) or agents must trust each replica's",
                s.data_dir / SIGNING_KEY_FILE,
            )
        return Signer.from_seed(seed)

    async def _admin_key(self) -> str | None:
        """On a store that never had an API key, make a global admin key, keep it in the
        data directory (readable only by the owner) and return it to be printed once."""
        path = self.settings.data_dir / ADMIN_KEY_FILE
        with acting_as(system("first-start")):
            # Kept before the key is committed: a crash cannot leave a key nobody holds.
            new = await self.api_keys.bootstrap(lambda secret: write_private(path, secret.encode() + b"\n"))
        return None if new is None else new.secret

    def _token_keyring(self) -> TokenKeyring:
        """The node token keys: configured (a file or the PEM itself), else a key made in
        the data directory on first start."""
        s = self.settings
        if s.token_signing_key:
            pem, source = _pem(s.token_signing_key)
        else:
            path = s.data_dir / TOKEN_KEY_FILE
            if not path.exists():
                write_private(path, generate_private_pem())
                if not s.embedded:
                    log.warning(
                        "generated a node token signing key in %s: every replica must use the same "
                        "key (set CONTROLPLANE_TOKEN_SIGNING_KEY)",
                        path,
                    )
            pem, source = path.read_bytes(), str(path)
        verifying = [load_public(*_pem(item)) for item in s.token_verify_keys]
        return TokenKeyring(load_private(pem, source), verifying)

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

    async def _enrollment_token(self) -> tuple[str | None, bool]:
        """On a fresh store, create the default project and keep its token in the data
        directory, readable only by the owner, so the agent command can be printed."""
        path = self.settings.data_dir / TOKEN_FILE
        with acting_as(system("first-start")):
            token = await self.projects.ensure_default()
        if token is not None:
            write_private(path, token.encode() + b"\n")
            return token, True
        if path.exists():
            return path.read_text().strip(), False
        return None, False

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
        self._metrics_server, _thread = start_http_server(int(port), addr=host or "0.0.0.0")
        return int(self._metrics_server.server_port)

    def _build_rollouts(self) -> None:
        s = self.settings
        self.rollout_bus = RolloutBus()
        self.leases = Leases(self.store, utcnow, ttl=s.lease_ttl)
        # Gates call a heartbeat stale past --gate-stale-after (default: once the node
        # would be marked offline).
        self.rollouts = RolloutController(
            self.store, utcnow, self.hub, self.hub.wake, self.rollout_bus, stale_after=s.gate_staleness
        )
        self.rollout_directory = RolloutDirectory(
            self.store, utcnow, self.hub, self.hub.wake, self.rollout_bus
        )
        self.driver = RolloutDriver(self.rollouts, self.leases, s.rollout_tick.total_seconds(), record_pass)
        self.rollouts.wake = self.rollout_directory.wake = self.driver.wake
        # A step completes as soon as its nodes report, not on the next tick.
        self.nodes.on_report = self.driver.wake
        self.drift = DriftDetector(self.store, utcnow, self.hub, self.hub.wake, grace=s.drift_grace)
        self.rollout_tasks = RolloutTasks(
            self.driver,
            self.store,
            self.rollout_bus,
            self.drift,
            self.leases,
            s.drift_interval.total_seconds(),
        )

    def _on_nack(self, node: Node, report: StatusReport) -> None:
        _count_nack(node, report)
        # A NACK can decide a rollout step (its failure budget): let the driver look now.
        self.driver.wake()

    async def _sweep_offline(self) -> None:
        with acting_as(system("offline-sweep")):
            marked = await self.nodes.mark_offline(self.settings.offline_after)
        if marked:
            log.info("marked %d node(s) offline: %s", len(marked), ", ".join(marked[:20]))

    async def _prune(self) -> None:
        s = self.settings
        floor = await self.feed.floor_candidate(
            s.retain_revisions, time.time() - s.retain_for.total_seconds()
        )
        if floor <= self.hub.floor:
            return
        # One replica prunes at a time: the others would only repeat its deletes. The
        # lease is left to expire, so whoever runs next after that takes it.
        if await self.leases.acquire(RETENTION_LEASE) is None:
            return
        with acting_as(system("retention")):
            deleted = await retention.prune(self.store, floor)
        log.info("retention: floor is now %d, %d rows pruned", floor, deleted)
        self.hub.wake()


async def _blob_store(s: Settings) -> BlobStore:
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


def _pem(value: str) -> tuple[bytes, str]:
    """A PEM given inline (an environment variable) or as a file path."""
    if value.lstrip().startswith("-----BEGIN"):
        return value.encode(), "the configured PEM"
    return Path(value).read_bytes(), value


def _count_nack(node: Node, report: StatusReport) -> None:
    watch_metrics.NACKS.inc()
    log.warning(
        "node %s rejected %s at revision %d: %s", node.id, report.digest, report.revision, report.error
    )


def agent_command(listen: str, port: int, token: str, project: str = DEFAULT_PROJECT) -> str:
    host = listen.rpartition(":")[0] or "127.0.0.1"
    if host in ("0.0.0.0", "[::]", "::"):
        host = "127.0.0.1"
    return (
        f"python -m agent_stub --server {host}:{port} --project {project} --token {token} "
        "--labels env=dev --state-dir ./agent-state --apply-command 'true'"
    )
