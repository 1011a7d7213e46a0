"""Notifications: channels (where messages go), events (written to the outbox in the
transaction of the change that causes them) and messages (one or more events of one
kind, delivered to one channel at least once). docs/notifications.md."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any


class ChannelKind(enum.StrEnum):
    # Our JSON, signed with the channel's HMAC key.
    WEBHOOK = "webhook"
    # A Slack-compatible incoming webhook: {"text": ...}.
    SLACK = "slack"
    # PagerDuty Events API v2: the channel's secret is the routing key.
    PAGERDUTY = "pagerduty"


class EventKind:
    """The kinds of event; a channel subscribes to some (or all)."""

    ROLLOUT_CREATED = "rollout.created"
    ROLLOUT_STARTED = "rollout.started"
    ROLLOUT_STEP_PROMOTED = "rollout.step_promoted"
    ROLLOUT_PAUSED = "rollout.paused"
    ROLLOUT_ROLLED_BACK = "rollout.rolled_back"
    ROLLOUT_SUCCEEDED = "rollout.succeeded"
    ROLLOUT_FAILED = "rollout.failed"
    ROLLOUT_CANCELLED = "rollout.cancelled"
    DRIFT_OPENED = "drift.opened"
    DRIFT_CLOSED = "drift.closed"
    NODE_OFFLINE = "node.offline"
    BUNDLE_REVOKED = "bundle.revoked"
    AUDIT_VERIFICATION_FAILED = "audit.verification_failed"
    # A rollout's post-rollout webhook gate: routed only to the channel it names.
    ROLLOUT_POST_ROLLOUT = "rollout.post_rollout"


EVENT_KINDS = frozenset(v for k, v in vars(EventKind).items() if k.isupper())
# Events of these kinds page someone (PagerDuty severity "error"); others are "info".
SEVERE = frozenset(
    {
        EventKind.ROLLOUT_ROLLED_BACK,
        EventKind.ROLLOUT_FAILED,
        EventKind.NODE_OFFLINE,
        EventKind.BUNDLE_REVOKED,
        EventKind.AUDIT_VERIFICATION_FAILED,
    }
)
# Events without a project (audit verification covers the whole server).
SERVER = "*"


class MessageState(enum.StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    # Out of attempts: kept for an operator to look at and redeliver.
    DEAD = "dead"


@dataclass(frozen=True, slots=True)
class Channel:
    id: str
    project: str
    name: str
    kind: ChannelKind
    url: str
    # Write-only: the HMAC key (webhook, slack) or the routing key (pagerduty). Never
    # in an answer, an audit entry or a log line.
    secret: str
    # Event kinds routed here; empty: every kind.
    events: tuple[str, ...] = ()
    enabled: bool = True
    # At most this many messages a minute; events beyond wait and are grouped.
    rate_per_minute: int = 6
    # A new message waits this long for more events of its kind before it is sent.
    group_window: timedelta = timedelta(seconds=10)
    max_attempts: int = 8
    created_at: datetime | None = None
    updated_at: datetime | None = None
    created_by: str = ""

    def wants(self, kind: str) -> bool:
        return self.enabled and (not self.events or kind in self.events)

    def public(self) -> dict[str, Any]:
        """For audit entries: everything but the secret."""
        return {
            "name": self.name,
            "kind": self.kind.value,
            "url": self.url,
            "events": list(self.events),
            "enabled": self.enabled,
            "rate_per_minute": self.rate_per_minute,
            "group_window_seconds": self.group_window.total_seconds(),
            "max_attempts": self.max_attempts,
            "has_secret": bool(self.secret),
        }


@dataclass(frozen=True, slots=True)
class NotificationEvent:
    project: str
    kind: str
    subject: str
    summary: str
    at: datetime
    data: Mapping[str, Any] = field(default_factory=dict)
    # Assigned by the outbox.
    id: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "project": self.project,
            "kind": self.kind,
            "subject": self.subject,
            "summary": self.summary,
            "at": self.at.isoformat(),
            "data": dict(self.data),
        }


@dataclass(frozen=True, slots=True)
class Message:
    id: str
    channel_id: str
    project: str
    kind: str
    events: Sequence[NotificationEvent]
    state: MessageState
    created_at: datetime
    next_attempt_at: datetime
    attempts: int = 0
    last_error: str = ""
    last_status: int = 0
    delivered_at: datetime | None = None
