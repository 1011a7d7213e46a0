"""Per-RPC metrics and spans, taken by the interceptor around every call.

Metrics use the names and labels of go-grpc-prometheus (`grpc_server_started_total`,
`grpc_server_handled_total`, `grpc_server_handling_seconds`; `grpc_type`,
`grpc_service`, `grpc_method`, `grpc_code`), so stock gRPC dashboards and alerts work
on them unchanged. A span per call continues the caller's W3C trace context when
tracing is on (controlplane/telemetry/tracing.py); off, `span` is a shared no-op.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client import Counter, Histogram

from controlplane.telemetry import tracing

STARTED = Counter(
    "grpc_server_started_total",
    "RPCs started on the server.",
    ["grpc_type", "grpc_service", "grpc_method"],
)
HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, whatever their status code.",
    ["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
)
HANDLING = Histogram(
    "grpc_server_handling_seconds",
    "Time from an RPC's start to its status (for streams: the stream's life).",
    ["grpc_type", "grpc_service", "grpc_method"],
    # Unary calls take 1-100 ms; the top buckets hold the streams' 10-20 min lives.
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60, 300, 1200),
)

# The codes that say the server failed (OpenTelemetry's rule for server spans); the
# rest are the caller's doing, or normal ends.
SERVER_FAILURES = frozenset(
    {"UNKNOWN", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "DEADLINE_EXCEEDED", "UNIMPLEMENTED"}
)
# Logged whatever the level: a bug or lost data. UNAVAILABLE is not among them: every
# stream ends with it when the server stops.
LOGGED_FAILURES = frozenset({"UNKNOWN", "INTERNAL", "DATA_LOSS"})
log = logging.getLogger(__name__)

_TYPES = {
    "unary_unary": "unary",
    "unary_stream": "server_stream",
    "stream_unary": "client_stream",
    "stream_stream": "bidi_stream",
}


@dataclass(frozen=True, slots=True)
class Method:
    """One method's label values and metric children, made once per method."""

    full: str
    service: str
    name: str
    started: Any
    handling: Any
    labels: tuple[str, str, str]

    @classmethod
    def of(cls, method: str, kind: str) -> Method:
        service, _, name = method.lstrip("/").partition("/")
        labels = (_TYPES.get(kind, kind), service, name)
        return cls(method, service, name, STARTED.labels(*labels), HANDLING.labels(*labels), labels)


def code_of(context: grpc.aio.ServicerContext, error: BaseException | None) -> str:
    """The status the call ends with."""
    if isinstance(error, asyncio.CancelledError):
        return "CANCELLED"
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    if isinstance(code, int):
        # Some grpc versions keep the raw number once abort() has run.
        for status in grpc.StatusCode:
            if status.value[0] == code:
                return str(status.name)
    return "UNKNOWN" if error is not None and not isinstance(error, grpc.aio.AbortError) else "OK"


@contextlib.contextmanager
def call(method: Method, context: grpc.aio.ServicerContext) -> Iterator[None]:
    """Count and time one call; with tracing on, run it inside a server span."""
    method.started.inc()
    start = time.perf_counter()
    span_cm: Any = _span(method, context) if tracing.enabled() else contextlib.nullcontext()
    error: BaseException | None = None
    with span_cm as span:
        try:
            yield
        except BaseException as e:
            error = e
            raise
        finally:
            code = code_of(context, error)
            elapsed = time.perf_counter() - start
            method.handling.observe(elapsed)
            HANDLED.labels(*method.labels, code).inc()
            if span is not None:
                _end(span, code)
            # An access log at DEBUG (`--log-level debug`); the server's own failures always.
            level = logging.WARNING if code in LOGGED_FAILURES else logging.DEBUG
            if log.isEnabledFor(level):
                fields = {"method": method.full.lstrip("/"), "code": code, "ms": round(elapsed * 1000, 2)}
                log.log(level, "rpc.done %s", fields, extra={"event_name": "rpc.done", "fields": fields})


def _span(method: Method, context: grpc.aio.ServicerContext) -> Any:
    from opentelemetry.trace import SpanKind

    parent = tracing.context_from(context.invocation_metadata() or ())
    return tracing.tracer().start_as_current_span(
        method.full.lstrip("/"),
        context=parent,
        kind=SpanKind.SERVER,
        attributes={"rpc.system": "grpc", "rpc.service": method.service, "rpc.method": method.name},
        record_exception=False,
        set_status_on_exception=False,
    )


def _end(span: Any, code: str) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute("rpc.grpc.status_code", grpc.StatusCode[code].value[0])
    if code in SERVER_FAILURES:
        span.set_status(Status(StatusCode.ERROR, code))


def annotate(**ids: str) -> None:
    """Put the call's ids (request, project, node) on its span."""
    if not tracing.enabled():
        return
    from opentelemetry import trace

    span = trace.get_current_span()
    for key, value in ids.items():
        if value:
            span.set_attribute(f"controlplane.{key}", value)
