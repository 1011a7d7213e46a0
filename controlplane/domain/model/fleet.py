"""Plain records the domain works with; the store maps rows to these."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, get_args


class NodeStatus(enum.StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"


class Health(enum.StrEnum):
    UNKNOWN = "unknown"
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"


class Enrollment(enum.StrEnum):
    """How a node was enrolled (docs/xds.md)."""

    # RegisterNode with an enrollment token: an agent, or an Envoy enrolled by
    # `controlplane envoy bootstrap`. It holds a credential of its own.
    REGISTERED = "registered"
    # An Envoy that enrolled itself on its first xDS contact with an enrollment token
    # (`serve --xds-enrollment`): that token resumes it; no one holds its credential.
    XDS_FIRST_CONTACT = "xds_first_contact"


class ReportPhase(enum.StrEnum):
    DOWNLOADED = "downloaded"
    ACTIVE = "active"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Project:
    name: str
    created_at: datetime
    node_count: int = 0


@dataclass(frozen=True, slots=True)
class NodeMetrics:
    """What a heartbeat reported. None is a metric the node did not send: it is stored
    and shown as absent, and a gate or canary analysis that needs it fails on it (a
    missing value is never read as 0.0)."""

    health: Health = Health.UNKNOWN
    error_rate: float | None = None
    p99_latency_ms: float | None = None
    cpu_percent: float | None = None
    memory_percent: float | None = None
    requests_per_second: float | None = None


MetricName = Literal["error_rate", "p99_latency_ms", "cpu_percent", "memory_percent", "requests_per_second"]
# The numeric fields of NodeMetrics, in declaration order (the store's columns too).
METRIC_NAMES: tuple[MetricName, ...] = get_args(MetricName)


@dataclass(frozen=True, slots=True)
class HeartbeatRecord:
    received_at: datetime
    metrics: NodeMetrics
    applied_digest: str


@dataclass(frozen=True, slots=True)
class XdsRecord:
    """What an xDS node had acknowledged when it reported (ACTIVE or FAILED), kept so
    that every replica shows it, not only the one holding its stream (docs/xds.md)."""

    # Type URL -> the version it last acknowledged.
    acked: Mapping[str, str]
    # The last revision it acknowledged whole: what it runs.
    running_revision: int
    running_digest: str
    # The last response it refused (NACK): 0 and "" when none.
    nack_revision: int = 0
    nack_type_url: str = ""
    nack_error: str = ""
    recorded_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class StatusReport:
    stream_id: str
    revision: int
    digest: str
    phase: ReportPhase
    error: str
    reported_at: datetime
    # An xDS node's acknowledged versions with its report (stored beside it); None for
    # an agent's report.
    xds: XdsRecord | None = None


@dataclass(frozen=True, slots=True)
class Node:
    id: str
    project: str
    name: str
    labels: Mapping[str, str]
    status: NodeStatus
    registered_at: datetime
    agent_version: str = ""
    hostname: str = ""
    last_heartbeat: HeartbeatRecord | None = None
    applied_digest: str = ""
    applied_revision: int = 0
    last_report: StatusReport | None = None
    failed_digest: str = ""
    failed_revision: int = 0
    failed_error: str = ""
    extra: Mapping[str, str] = field(default_factory=dict)
    # host:port its proxy serves on (`--address`), for routers; "" when not given.
    address: str = ""
    enrollment: Enrollment = Enrollment.REGISTERED
    # An operator set its labels (UpdateNodeLabels): an Envoy's node.metadata no longer
    # changes them (`serve --xds-metadata-labels`); a new registration clears it.
    labels_by_operator: bool = False
    # Why the bundle the node runs (applied) or is assigned (desired) was revoked; empty
    # when it was not. Filled by the node registry's reads, not stored on the node.
    applied_revoked_reason: str = ""
    desired_revoked_reason: str = ""
