"""Records to messages and back. No logic beyond the mapping."""

from __future__ import annotations

from datetime import datetime, timedelta

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from controlplane.api.node.v1 import node_pb2
from controlplane.api.project.v1 import project_pb2
from controlplane.domain.kernel.errors import InvalidArgument
from controlplane.domain.model.desired import DesiredRow
from controlplane.domain.model.fleet import (
    METRIC_NAMES,
    Enrollment,
    Health,
    HeartbeatRecord,
    Node,
    NodeMetrics,
    NodeStatus,
    Project,
    ReportPhase,
    XdsRecord,
)
from controlplane.domain.routing.directory import RouterView
from controlplane.xds import types as xds_types
from controlplane.xds.status import NodeXdsStatus

_HEALTH = {
    Health.UNKNOWN: node_pb2.HEALTH_STATUS_UNSPECIFIED,
    Health.HEALTHY: node_pb2.HEALTH_STATUS_HEALTHY,
    Health.DEGRADED: node_pb2.HEALTH_STATUS_DEGRADED,
    Health.UNHEALTHY: node_pb2.HEALTH_STATUS_UNHEALTHY,
}
_HEALTH_IN = {v: k for k, v in _HEALTH.items()}
_STATUS = {NodeStatus.ONLINE: node_pb2.NODE_STATUS_ONLINE, NodeStatus.OFFLINE: node_pb2.NODE_STATUS_OFFLINE}
_STATUS_IN = {v: k for k, v in _STATUS.items()}
_PHASE = {
    ReportPhase.DOWNLOADED: node_pb2.REPORT_PHASE_DOWNLOADED,
    ReportPhase.ACTIVE: node_pb2.REPORT_PHASE_ACTIVE,
    ReportPhase.FAILED: node_pb2.REPORT_PHASE_FAILED,
}
PHASE_IN = {v: k for k, v in _PHASE.items()}
_ENROLLMENT = {
    Enrollment.REGISTERED: node_pb2.NODE_ENROLLMENT_REGISTERED,
    Enrollment.XDS_FIRST_CONTACT: node_pb2.NODE_ENROLLMENT_XDS_FIRST_CONTACT,
}


def duration_in(d: Duration, field: str) -> timedelta:
    """A request's Duration as a timedelta. A Duration holds up to ±2^63 s, a timedelta
    ends at 10^9 days: a value past that is refused naming the field, never INTERNAL."""
    try:
        return timedelta(seconds=d.seconds, microseconds=d.nanos // 1000)
    except (OverflowError, ValueError):
        raise InvalidArgument("is not a duration this server can represent", field=field) from None


def timestamp(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def metrics_in(m: node_pb2.NodeMetrics) -> NodeMetrics:
    """A field the node did not set stays absent (None), never 0.0."""
    return NodeMetrics(
        _HEALTH_IN.get(m.health, Health.UNKNOWN),
        *(getattr(m, name) if m.HasField(name) else None for name in METRIC_NAMES),
    )


def metrics_out(m: NodeMetrics) -> node_pb2.NodeMetrics:
    present = {name: value for name in METRIC_NAMES if (value := getattr(m, name)) is not None}
    return node_pb2.NodeMetrics(health=_HEALTH[m.health], **present)


def status_in(value: int) -> NodeStatus | None:
    return _STATUS_IN.get(node_pb2.NodeStatus.ValueType(value))


def heartbeat_out(beat: HeartbeatRecord) -> node_pb2.Heartbeat:
    return node_pb2.Heartbeat(
        received_at=timestamp(beat.received_at),
        metrics=metrics_out(beat.metrics),
        applied_digest=beat.applied_digest,
    )


def xds_out(record: XdsRecord, live: bool) -> node_pb2.XdsStream:
    msg = node_pb2.XdsStream(
        acked_versions={xds_types.short(url): v for url, v in record.acked.items()},
        running_revision=record.running_revision,
        running_digest=record.running_digest,
        live=live,
    )
    if record.nack_type_url:
        msg.last_nack.CopyFrom(
            node_pb2.XdsNack(
                revision=record.nack_revision,
                type=xds_types.short(record.nack_type_url),
                error=record.nack_error,
            )
        )
    if record.recorded_at is not None:
        msg.recorded_at.FromDatetime(record.recorded_at)
    return msg


def node_out(
    node: Node,
    desired: DesiredRow | None,
    xds: NodeXdsStatus | None = None,
    recorded: XdsRecord | None = None,
) -> node_pb2.Node:
    """`xds`: the node's open stream on this server; else `recorded`, what its last
    ACTIVE or FAILED report kept."""
    msg = node_pb2.Node(
        id=node.id,
        project=node.project,
        name=node.name,
        labels=dict(node.labels),
        status=_STATUS[node.status],
        registered_at=timestamp(node.registered_at),
        applied_digest=node.applied_digest,
        applied_revision=node.applied_revision,
        failed_digest=node.failed_digest,
        failed_error=node.failed_error,
        agent_version=node.agent_version,
        hostname=node.hostname,
        applied_revoked_reason=node.applied_revoked_reason,
        desired_revoked_reason=node.desired_revoked_reason,
        address=node.address,
        enrollment=_ENROLLMENT[node.enrollment],
        labels_by_operator=node.labels_by_operator,
    )
    if desired is not None:
        msg.desired_digest = desired.digest
        msg.desired_revision = desired.revision
    if node.last_heartbeat is not None:
        msg.last_heartbeat_at.FromDatetime(node.last_heartbeat.received_at)
        msg.last_heartbeat.CopyFrom(heartbeat_out(node.last_heartbeat))
    if xds is not None:
        msg.xds.CopyFrom(xds_out(xds.record(), live=True))
    elif recorded is not None:
        msg.xds.CopyFrom(xds_out(recorded, live=False))
    if node.last_report is not None:
        r = node.last_report
        msg.last_report.CopyFrom(
            node_pb2.StatusReport(
                stream_id=r.stream_id,
                revision=r.revision,
                digest=r.digest,
                phase=_PHASE[r.phase],
                error=r.error,
                reported_at=timestamp(r.reported_at),
            )
        )
    return msg


def router_out(view: RouterView) -> node_pb2.Router:
    router, table = view.router, view.table
    return node_pb2.Router(
        node_id=router.node_id,
        project=router.project,
        selector=router.selector,
        backend=router.backend,
        revision=view.revision,
        backends=[
            node_pb2.RouterBackend(node_id=b.node_id, address=b.address, weight=b.weight)
            for b in (table.backends if table is not None else ())
        ],
        unrouted=list(table.unrouted) if table is not None else [],
        reason=table.reason if table is not None else "",
        applied_revision=view.applied_revision,
        error=view.error,
        created_by=router.created_by,
        created_at=timestamp(router.created_at),
    )


def project_out(project: Project) -> project_pb2.Project:
    return project_pb2.Project(
        name=project.name, created_at=timestamp(project.created_at), node_count=project.node_count
    )
