"""Rollout tables: rollouts and their steps, per-node progress, claims, approvals, the
per-rollout event history, freeze windows, leases and drift."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
)

from controlplane.store.schema.base import Json, UTCDateTime, metadata

# One row per rollout. `version` rises on every update (writers compare it: optimistic
# concurrency between the driver and operators); `event_seq` numbers the rollout's
# events, allocated under the same row lock so they commit in order.
rollouts = Table(
    "rollouts",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("project", String(63), ForeignKey("projects.name"), nullable=False),
    Column("bundle_digest", String(80), nullable=False),
    Column("selector", String(1000), nullable=False),
    Column("strategy", String(16), nullable=False),
    Column("spec", Json, nullable=False),
    Column("state", String(24), nullable=False),
    Column("reason", Text, nullable=False),
    Column("created_by", String(200), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("scheduled_at", UTCDateTime, nullable=True),
    Column("started_at", UTCDateTime, nullable=True),
    Column("finished_at", UTCDateTime, nullable=True),
    Column("paused_at", UTCDateTime, nullable=True),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("current_step", Integer, nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("event_seq", BigInteger, nullable=False),
    Column("progress", Json, nullable=False),
    Index(None, "project", "created_at"),
    Index(None, "state"),
)

rollout_steps = Table(
    "rollout_steps",
    metadata,
    Column("rollout_id", String(40), ForeignKey("rollouts.id", ondelete="CASCADE"), nullable=False),
    Column("idx", Integer, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("state", String(16), nullable=False),
    Column("traffic_weight", Integer, nullable=False),
    Column("node_count", Integer, nullable=False),
    Column("revision", BigInteger, nullable=False),
    Column("started_at", UTCDateTime, nullable=True),
    Column("applied_at", UTCDateTime, nullable=True),
    Column("bake_started_at", UTCDateTime, nullable=True),
    Column("finished_at", UTCDateTime, nullable=True),
    Column("gate_failing_since", UTCDateTime, nullable=True),
    Column("paused_seconds", Float, nullable=False),
    Column("extensions", Integer, nullable=False),
    Column("detail", Json, nullable=False),
    PrimaryKeyConstraint("rollout_id", "idx"),
)

# Every node a rollout targets. `previous_*` is what the node's own `node:<id>` key held
# before the rollout first wrote it (digest NULL = nothing: rollback writes a tombstone).
rollout_nodes = Table(
    "rollout_nodes",
    metadata,
    Column("rollout_id", String(40), ForeignKey("rollouts.id", ondelete="CASCADE"), nullable=False),
    Column("node_id", String(64), nullable=False),
    Column("step", Integer, nullable=False),
    Column("role", String(8), nullable=False),
    Column("state", String(16), nullable=False),
    Column("previous_digest", String(80), nullable=False),
    Column("previous_key_digest", String(80), nullable=True),
    Column("previous_weight", Integer, nullable=False),
    Column("assigned_revision", BigInteger, nullable=False),
    Column("error", Text, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    PrimaryKeyConstraint("rollout_id", "node_id"),
    Index(None, "rollout_id", "step"),
)

# A node belongs to at most one active rollout: the primary key makes a concurrent
# conflicting create fail in the database, whatever replica it runs on.
rollout_claims = Table(
    "rollout_claims",
    metadata,
    Column("node_id", String(64), primary_key=True),
    Column("rollout_id", String(40), ForeignKey("rollouts.id", ondelete="CASCADE"), nullable=False),
    Index(None, "rollout_id"),
)

rollout_approvals = Table(
    "rollout_approvals",
    metadata,
    Column("rollout_id", String(40), ForeignKey("rollouts.id", ondelete="CASCADE"), nullable=False),
    Column("actor", String(200), nullable=False),
    Column("at", UTCDateTime, nullable=False),
    Column("comment", Text, nullable=False),
    PrimaryKeyConstraint("rollout_id", "actor"),
)

# The recorded history of a rollout: every state, step and node change, numbered per
# rollout without gaps. WatchRollout replays it; tests check it.
rollout_events = Table(
    "rollout_events",
    metadata,
    Column("rollout_id", String(40), ForeignKey("rollouts.id", ondelete="CASCADE"), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("at", UTCDateTime, nullable=False),
    Column("kind", String(32), nullable=False),
    Column("step", Integer, nullable=True),
    Column("node_id", String(64), nullable=True),
    Column("state", String(24), nullable=False),
    Column("message", Text, nullable=False),
    Column("detail", Json, nullable=False),
    PrimaryKeyConstraint("rollout_id", "seq"),
)

freeze_windows = Table(
    "freeze_windows",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("project", String(63), ForeignKey("projects.name"), nullable=False),
    Column("name", String(100), nullable=False),
    Column("starts_at", UTCDateTime, nullable=False),
    Column("ends_at", UTCDateTime, nullable=False),
    Column("reason", Text, nullable=False),
    Column("created_by", String(200), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Index(None, "project", "ends_at"),
)

# Leases for background work. `epoch` rises whenever the lease changes hands: it is the
# fencing token every write of the holder is checked against.
leases = Table(
    "leases",
    metadata,
    Column("name", String(200), primary_key=True),
    Column("holder", String(100), nullable=False),
    Column("epoch", BigInteger, nullable=False),
    Column("acquired_at", UTCDateTime, nullable=False),
    Column("renewed_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
)

# One row per drift episode. `open_node_id` is the node id while the episode is open and
# NULL once resolved: its unique index allows one open episode per node (NULLs never
# collide, on either database).
drift_events = Table(
    "drift_events",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("project", String(63), ForeignKey("projects.name"), nullable=False),
    Column("node_id", String(64), nullable=False),
    Column("open_node_id", String(64), nullable=True, unique=True),
    Column("desired_digest", String(80), nullable=False),
    Column("applied_digest", String(80), nullable=False),
    Column("detected_at", UTCDateTime, nullable=False),
    Column("resolved_at", UTCDateTime, nullable=True),
    Column("resolution", String(32), nullable=False),
    Column("remediations", Integer, nullable=False),
    Column("last_remediated_at", UTCDateTime, nullable=True),
    Index(None, "project", "detected_at"),
    Index(None, "node_id"),
)

drift_settings = Table(
    "drift_settings",
    metadata,
    Column("project", String(63), ForeignKey("projects.name"), primary_key=True),
    Column("remediate", Boolean, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)
