"""Notifications: channels, the outbox of events, and the messages delivered from it
(domain/model/notify.py, docs/notifications.md)."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
)

from controlplane.store.schema.base import Json, UTCDateTime, metadata

notification_channels = Table(
    "notification_channels",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("project", String(63), ForeignKey("projects.name"), nullable=False),
    Column("name", String(100), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("url", Text, nullable=False),
    # Write-only (never returned): the HMAC key or the PagerDuty routing key.
    Column("secret", Text, nullable=False),
    Column("events", Json, nullable=False),
    Column("enabled", Boolean, nullable=False),
    Column("rate_per_minute", Integer, nullable=False),
    Column("group_window_seconds", Float, nullable=False),
    Column("max_attempts", Integer, nullable=False),
    Column("created_by", String(200), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    UniqueConstraint("project", "name"),
)

# The outbox: one row per event, written in the transaction of the change that causes it.
# The delivery worker fans undispatched rows out to channels (and stamps them); rows are
# never read by id order as a cursor (autoincrement ids commit out of order).
notification_events = Table(
    "notification_events",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("project", String(63), nullable=False),
    Column("kind", String(40), nullable=False),
    Column("subject", String(300), nullable=False),
    Column("summary", Text, nullable=False),
    Column("data", Json, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("dispatched_at", UTCDateTime, nullable=True),
    Index(None, "dispatched_at"),
)

# One message: events of one kind for one channel, delivered at least once.
notification_messages = Table(
    "notification_messages",
    metadata,
    Column("id", String(40), primary_key=True),
    Column(
        "channel_id", String(40), ForeignKey("notification_channels.id", ondelete="CASCADE"), nullable=False
    ),
    Column("project", String(63), nullable=False),
    Column("kind", String(40), nullable=False),
    Column("events", Json, nullable=False),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("next_attempt_at", UTCDateTime, nullable=False),
    Column("last_error", Text, nullable=False),
    Column("last_status", Integer, nullable=False),
    Column("delivered_at", UTCDateTime, nullable=True),
    Index(None, "state", "next_attempt_at"),
    Index(None, "channel_id", "created_at"),
)
