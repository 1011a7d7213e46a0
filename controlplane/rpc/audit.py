"""AuditService: list, export (JSON lines) and verify the audit chain."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import grpc
from google.protobuf.struct_pb2 import Struct
from google.protobuf.timestamp_pb2 import Timestamp

from controlplane.api.audit.v1 import audit_pb2 as pb
from controlplane.api.audit.v1 import audit_pb2_grpc
from controlplane.domain.audit.chain import Checkpoint
from controlplane.domain.audit.trail import AuditTrail, json_line
from controlplane.domain.kernel.errors import InvalidArgument
from controlplane.domain.model.audit import AuditEntry, AuditQuery

# Lines per streamed message: well under the message size limit for any entry we write.
_LINES_PER_MESSAGE = 100


class AuditServicer(audit_pb2_grpc.AuditServiceServicer):
    def __init__(self, trail: AuditTrail):
        self._trail = trail

    async def ListAuditEvents(
        self, request: pb.ListAuditEventsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAuditEventsResponse:
        entries, token = await self._trail.page(
            _query(request.project, request.filter),
            request.page_size,
            request.page_token,
            request.newest_first,
        )
        return pb.ListAuditEventsResponse(events=[event_out(e) for e in entries], next_page_token=token)

    async def ExportAuditEvents(
        self, request: pb.ExportAuditEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ExportAuditEventsResponse]:
        async for batch in self._trail.export(_query(request.project, request.filter)):
            for i in range(0, len(batch), _LINES_PER_MESSAGE):
                lines = b"".join(json_line(e) for e in batch[i : i + _LINES_PER_MESSAGE])
                yield pb.ExportAuditEventsResponse(jsonl=lines)

    async def VerifyAuditChain(
        self, request: pb.VerifyAuditChainRequest, context: grpc.aio.ServicerContext
    ) -> pb.VerifyAuditChainResponse:
        report = await self._trail.verify(Checkpoint(request.checkpoint_seq, request.checkpoint_mac))
        return pb.VerifyAuditChainResponse(
            ok=report.ok,
            entries=report.entries,
            first_bad_seq=report.first_bad_seq,
            reason=report.reason,
            head_seq=report.head_seq,
            head_mac=report.head_mac,
        )


def _query(project: str, f: pb.AuditFilter) -> AuditQuery:
    return AuditQuery(
        project=project,
        actor=f.actor,
        action=f.action,
        resource=f.resource,
        start=_time(f.start_time, "filter.start_time") if f.HasField("start_time") else "",
        end=_time(f.end_time, "filter.end_time") if f.HasField("end_time") else "",
    )


def _time(value: Timestamp, field: str) -> str:
    """The stored text form of a time (see store/audit.py), for range comparisons."""
    try:
        return value.ToDatetime(tzinfo=UTC).isoformat(timespec="microseconds")
    except (ValueError, OverflowError):
        raise InvalidArgument("not a valid time", field=field) from None


def event_out(entry: AuditEntry) -> pb.AuditEvent:
    event = pb.AuditEvent(
        seq=entry.seq,
        actor=entry.actor,
        action=entry.action,
        resource=entry.resource,
        project=entry.project,
        request_id=entry.request_id,
        mac=entry.mac,
    )
    event.time.FromDatetime(datetime.fromisoformat(entry.at))
    if entry.before is not None:
        event.before.CopyFrom(_struct(entry.before))
    if entry.after is not None:
        event.after.CopyFrom(_struct(entry.after))
    return event


def _struct(value: object) -> Struct:
    s = Struct()
    if isinstance(value, dict):
        s.update(value)
    return s
