"""ReportStatus: DOWNLOADED, ACTIVE (ACK) and FAILED (NACK) back to the control plane.

A report that cannot be delivered for a transient reason is kept (only the latest ACK or
NACK matters) and sent again once the next stream has started; the server accepts a
report naming an older stream as long as it did send that digest at that revision.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from agent_stub.logs import EventLog
from agent_stub.rpc import ErrorClass, classify, error_summary
from controlplane.api.node.v1 import node_pb2, node_pb2_grpc

PHASES = {
    "DOWNLOADED": node_pb2.REPORT_PHASE_DOWNLOADED,
    "ACTIVE": node_pb2.REPORT_PHASE_ACTIVE,
    "FAILED": node_pb2.REPORT_PHASE_FAILED,
}


class Reporter:
    def __init__(
        self,
        channel: Any,
        node_id: Callable[[], str],
        metadata: Callable[[], tuple[tuple[str, str], ...]],
        log: EventLog,
        timeout: float = 10.0,
    ):
        self._stub = node_pb2_grpc.NodeServiceStub(channel)
        self._node_id = node_id
        self._metadata = metadata
        self._log = log
        self.timeout = timeout
        self.pending: node_pb2.ReportStatusRequest | None = None
        self.sent = 0

    async def report(self, stream_id: str, revision: int, digest: str, phase: str, error: str = "") -> bool:
        request = node_pb2.ReportStatusRequest(
            node_id=self._node_id(),
            stream_id=stream_id,
            revision=revision,
            digest=digest,
            phase=PHASES[phase],
            error=error,
        )
        return await self._send(request, phase)

    async def flush(self) -> None:
        """Send the report a transient failure held back, if any."""
        request, self.pending = self.pending, None
        if request is not None:
            await self._send(request, node_pb2.ReportPhase.Name(request.phase).removeprefix("REPORT_PHASE_"))

    async def _send(self, request: node_pb2.ReportStatusRequest, phase: str) -> bool:
        try:
            await self._stub.ReportStatus(request, metadata=self._metadata(), timeout=self.timeout)
        except (TimeoutError, grpc.RpcError) as e:
            summary = error_summary(e) if isinstance(e, grpc.RpcError) else "timed out"
            code = e.code() if isinstance(e, grpc.RpcError) and callable(getattr(e, "code", None)) else None
            transient = code is None or classify(code) is not ErrorClass.REFUSED
            if transient and phase != "DOWNLOADED":
                self.pending = request
            self._log.warning(
                "report.failed",
                phase=phase,
                revision=request.revision,
                digest=request.digest,
                error=summary,
                will_retry=transient and phase != "DOWNLOADED",
            )
            return False
        self.sent += 1
        self._log.info("report.sent", phase=phase, revision=request.revision, digest=request.digest)
        return True
