"""Core tables: projects, nodes, bundles, the desired-state log and the revision counter."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
)

from controlplane.store.schema.base import Json, UTCDateTime, metadata

# Server-wide settings: `epoch` (changes when history is rebuilt), `epoch_tag` (the
# database identity the epoch belongs to, store/epochs.py), `floor_revision`.
server_meta = Table(
    "server_meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

# Every history of revisions this database has held (store/epochs.py): the current one
# is `server_meta.epoch`; each other one's successor says where it forked from it.
epochs = Table(
    "epochs",
    metadata,
    Column("epoch", String(64), primary_key=True),
    # The epoch this one continues, and the last revision of it this history holds.
    Column("previous", String(64), nullable=True),
    Column("fork_revision", BigInteger, nullable=True),
    # The database identity the epoch was started on (`server_meta.epoch_tag` then).
    Column("tag", Text, nullable=False),
    # created, promoted, restored, migrated or manual.
    Column("reason", String(32), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
)

# One row. `UPDATE ... SET value = value + 1 RETURNING value` takes the row lock that
# serializes every desired-state writer until commit: revisions become visible in order.
revision_counter = Table(
    "revision_counter",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("value", BigInteger, nullable=False),
)

projects = Table(
    "projects",
    metadata,
    Column("name", String(63), primary_key=True),
    Column("created_at", UTCDateTime, nullable=False),
    # The rollout policy (domain/model/policy.py); migration 0008.
    Column("min_approvals", Integer, nullable=False, server_default="0"),
)

enrollment_tokens = Table(
    "enrollment_tokens",
    metadata,
    Column("token_hash", String(64), primary_key=True),
    Column("project", String(63), ForeignKey("projects.name"), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=True),
    Column("revoked_at", UTCDateTime, nullable=True),
    Column("uses_left", Integer, nullable=True),
)

nodes = Table(
    "nodes",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("project", String(63), ForeignKey("projects.name"), nullable=False),
    Column("name", String(128), nullable=False),
    Column("labels", Json, nullable=False),
    Column("credential_hash", String(64), nullable=False),
    Column("status", String(16), nullable=False),
    Column("registered_at", UTCDateTime, nullable=False),
    Column("agent_version", String(64), nullable=False, default=""),
    Column("hostname", String(255), nullable=False, default=""),
    # Latest heartbeat, denormalized for gates and listings. A metric the node did not
    # report is NULL (migration 0007), so a gate on it fails instead of reading 0.0.
    Column("last_heartbeat_at", UTCDateTime, nullable=True),
    Column("health", String(16), nullable=False, default="unknown"),
    Column("error_rate", Float, nullable=True),
    Column("p99_latency_ms", Float, nullable=True),
    Column("cpu_percent", Float, nullable=True),
    Column("memory_percent", Float, nullable=True),
    Column("requests_per_second", Float, nullable=True),
    Column("heartbeat_digest", String(80), nullable=False, default=""),
    Column("heartbeat_seq", BigInteger, nullable=False, default=0),
    # Acknowledged state (ReportStatus).
    Column("applied_digest", String(80), nullable=False, default=""),
    Column("applied_revision", BigInteger, nullable=False, default=0),
    Column("report_stream_id", String(64), nullable=True),
    Column("report_revision", BigInteger, nullable=True),
    Column("report_digest", String(80), nullable=True),
    Column("report_phase", String(16), nullable=True),
    Column("report_error", Text, nullable=True),
    Column("reported_at", UTCDateTime, nullable=True),
    Column("failed_digest", String(80), nullable=False, default=""),
    Column("failed_revision", BigInteger, nullable=False, default=0),
    Column("failed_error", Text, nullable=False, default=""),
    # host:port its proxy serves on, for routers (`--address`); migration 0013.
    Column("address", String(300), nullable=False, server_default=""),
    # How it was enrolled (model.fleet.Enrollment), and whether an operator set its
    # labels (an Envoy's node.metadata then no longer does); migration 0014.
    Column("enrollment", String(24), nullable=False, server_default="registered"),
    Column("labels_by_operator", Boolean, nullable=False, server_default=false()),
    UniqueConstraint("project", "name"),
    Index(None, "project", "id"),
    Index(None, "status", "last_heartbeat_at"),
)

# Router nodes (domain/routing/): each routes the nodes of its selector, through the
# backend section `backend` of its own configuration; migration 0013.
routers = Table(
    "routers",
    metadata,
    Column("node_id", String(64), ForeignKey("nodes.id", ondelete="CASCADE"), primary_key=True),
    Column("project", String(63), ForeignKey("projects.name"), nullable=False),
    Column("selector", String(1000), nullable=False),
    Column("backend", String(128), nullable=False),
    Column("created_by", String(200), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Index(None, "project"),
)

# Labels again, one row per pair, so selectors filter in SQL.
node_labels = Table(
    "node_labels",
    metadata,
    Column("node_id", String(64), ForeignKey("nodes.id", ondelete="CASCADE"), nullable=False),
    Column("key", String(63), nullable=False),
    Column("value", String(63), nullable=False),
    PrimaryKeyConstraint("node_id", "key"),
    Index(None, "key", "value", "node_id"),
)

# A ring buffer per node: slot = seq % history size, so history is bounded by design.
node_heartbeats = Table(
    "node_heartbeats",
    metadata,
    Column("node_id", String(64), ForeignKey("nodes.id", ondelete="CASCADE"), nullable=False),
    Column("slot", Integer, nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("received_at", UTCDateTime, nullable=False),
    Column("health", String(16), nullable=False),
    # NULL: not reported by that beat (as on `nodes`).
    Column("error_rate", Float, nullable=True),
    Column("p99_latency_ms", Float, nullable=True),
    Column("cpu_percent", Float, nullable=True),
    Column("memory_percent", Float, nullable=True),
    Column("requests_per_second", Float, nullable=True),
    Column("applied_digest", String(80), nullable=False),
    PrimaryKeyConstraint("node_id", "slot"),
)

# What an xDS node had acknowledged at its last ACTIVE or FAILED report (docs/xds.md),
# so every replica can show it, not only the one holding its stream; migration 0014.
# Written with the report, never per heartbeat.
node_xds = Table(
    "node_xds",
    metadata,
    Column("node_id", String(64), ForeignKey("nodes.id", ondelete="CASCADE"), primary_key=True),
    # Type URL -> the version Envoy acknowledged (at most the five served types).
    Column("acked", Json, nullable=False),
    Column("running_revision", BigInteger, nullable=False),
    Column("running_digest", String(80), nullable=False),
    # The last response it refused (NACK); 0 and "" when none.
    Column("nack_revision", BigInteger, nullable=False),
    Column("nack_type_url", String(200), nullable=False),
    Column("nack_error", Text, nullable=False),
    Column("recorded_at", UTCDateTime, nullable=False),
)

# One row per (project, digest). Its manifest and parsed structure are in
# `bundle_details`, its signatures in `bundle_signatures` (schema/bundles.py).
bundles = Table(
    "bundles",
    metadata,
    Column("project", String(63), ForeignKey("projects.name"), nullable=False),
    Column("digest", String(80), nullable=False),
    Column("version", String(63), nullable=True),
    Column("size_bytes", BigInteger, nullable=False),
    Column("file_count", Integer, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    # valid | failed | revoked; the reason is the validators' message or the operator's.
    Column("state", String(16), nullable=False, default="valid"),
    Column("state_reason", Text, nullable=False, default=""),
    Column("total_bytes", BigInteger, nullable=False, default=0),
    # sha256 of manifest.json: identical content is found by it whatever the compression.
    Column("manifest_digest", String(80), nullable=False, default=""),
    Column("validation", Json, nullable=True),
    Column("risk", String(8), nullable=False, default="low"),
    Column("risk_findings", Json, nullable=True),
    Column("risk_compared_with", String(80), nullable=False, default=""),
    Column("revoked_at", UTCDateTime, nullable=True),
    # The archive was garbage-collected.
    Column("purged_at", UTCDateTime, nullable=True),
    PrimaryKeyConstraint("project", "digest"),
    UniqueConstraint("project", "version"),
    Index(None, "project", "created_at"),
    Index(None, "project", "manifest_digest"),
    Index(None, "digest"),
)

# The desired-state log: one row per (watch key, revision). Never updated; superseded
# rows older than the retention floor are pruned, the latest row of each key never.
desired_state_log = Table(
    "desired_state_log",
    metadata,
    Column("key", String(200), nullable=False),
    Column("revision", BigInteger, nullable=False),
    Column("project", String(63), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("digest", String(80), nullable=False, default=""),
    Column("pinned", Boolean, nullable=False, default=False),
    Column("traffic_weight", Integer, nullable=False, default=100),
    Column("size_bytes", BigInteger, nullable=False, default=0),
    Column("annotations", Json, nullable=False),
    Column("labels", Json, nullable=True),
    Column("written_at", Float, nullable=False),
    # Null on rows written before bundles were signed (and on non-assignment rows).
    Column("signature", LargeBinary, nullable=True),
    Column("key_id", String(64), nullable=False, default=""),
    # W3C traceparent of the change's span; null when the writer did not trace.
    Column("trace_parent", String(64), nullable=True),
    # Set on the baseline a successful rollout leaves on its selector: {"baseline": rollout
    # id, "exclude": [node ids]} (domain/model/desired.py); migration 0012.
    Column("scope", Json, nullable=True),
    # ROUTES rows: a router's routing table (domain/model/routing.py); migration 0013.
    Column("routes", Json, nullable=True),
    PrimaryKeyConstraint("key", "revision"),
    Index(None, "revision"),
)
