"""OpenTelemetry traces: on when an OTLP endpoint is configured, off and free otherwise.

On with `--otlp-endpoint` (serve and the agent) or the standard variables
(`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, or
`OTEL_TRACES_EXPORTER=otlp`); `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`
keep it off. The exporter is OTLP over gRPC and reads the rest of `OTEL_EXPORTER_OTLP_*`
(headers, certificates, timeout) itself; the sampler comes from `OTEL_TRACES_SAMPLER`.
Off, nothing is imported beyond this module and every hook is a no-op.

Trace context crosses processes as W3C `traceparent` strings: taken from a caller's
metadata, stored with a desired-state change, carried to agents on the watch.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

_ENV_ENDPOINTS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
TRACEPARENT = "traceparent"

# The tracer once setup() turned tracing on; None means off.
_tracer: Any = None
_provider: Any = None


def process_name() -> str:
    """How log lines and spans name the serving process: host and pid."""
    return f"{socket.gethostname()}/{os.getpid()}"


def wanted(endpoint: str = "", environ: Mapping[str, str] | None = None) -> bool:
    """Whether tracing is configured: an endpoint given, or the standard variables."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporters == "none":
        return False
    return bool(endpoint) or exporters == "otlp" or any(env.get(name) for name in _ENV_ENDPOINTS)


@dataclass
class Tracing:
    """What setup() turned on; `shutdown()` exports what is still buffered."""

    enabled: bool

    def shutdown(self) -> None:
        global _tracer, _provider
        if _provider is not None:
            _provider.shutdown()
        _tracer = _provider = None


# xds-protos (Envoy's API) ships its own, older copy of OpenTelemetry's protos in the same
# `opentelemetry.proto` package: whichever distribution pip installs last owns the files.
PROTO_CLASH = (
    "xds-protos overwrote opentelemetry-proto's files; reinstall them: "
    "pip install --no-deps --force-reinstall opentelemetry-proto"
)


def setup(service: str, endpoint: str = "", process: str = "", exporter: Any = None) -> Tracing:
    """Turn tracing on if it is configured (`exporter`: a span exporter to use instead of
    OTLP, for benchmarks). Process-wide, like OpenTelemetry's own provider."""
    global _tracer, _provider
    if exporter is None and not wanted(endpoint):
        return Tracing(False)
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    if exporter is None:
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError as e:
            raise RuntimeError(f"the OTLP exporter does not import ({e}): {PROTO_CLASH}") from e

        if endpoint and "://" not in endpoint:
            # A bare host:port is a collector beside us, in plaintext (https:// for TLS).
            endpoint = "http://" + endpoint
        exporter = OTLPSpanExporter(endpoint=endpoint or None)
    resource = Resource.create(
        {
            "service.name": os.environ.get("OTEL_SERVICE_NAME") or service,
            "service.instance.id": process or process_name(),
            "process.pid": os.getpid(),
            "host.name": socket.gethostname(),
        }
    )
    _provider = TracerProvider(resource=resource)
    _provider.add_span_processor(BatchSpanProcessor(exporter))
    _tracer = _provider.get_tracer("controlplane")
    return Tracing(True)


def tracer() -> Any:
    """The tracer, or None when tracing is off."""
    return _tracer


def enabled() -> bool:
    return _tracer is not None


def context_from(carrier: Iterable[tuple[str, str | bytes]] | Mapping[str, str]) -> Any:
    """The OpenTelemetry context a caller sent (W3C `traceparent`, `tracestate`)."""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    items = carrier.items() if isinstance(carrier, Mapping) else carrier
    headers = {
        k: (v.decode(errors="replace") if isinstance(v, bytes) else v)
        for k, v in items
        if k in (TRACEPARENT, "tracestate")
    }
    return TraceContextTextMapPropagator().extract(headers)


def traceparent() -> str:
    """The current span's context as a W3C `traceparent`; empty when there is none."""
    if _tracer is None:
        return ""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    headers: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(headers)
    return headers.get(TRACEPARENT, "")


def link_to(parent: str) -> Sequence[Any]:
    """A link to the span a `traceparent` names (none when it is not one)."""
    if not parent:
        return ()
    from opentelemetry import trace

    context = trace.get_current_span(context_from({TRACEPARENT: parent})).get_span_context()
    return (trace.Link(context),) if context.is_valid else ()


def current_ids() -> tuple[str, str] | None:
    """(trace id, span id) in hex of the current span, for log lines."""
    if _tracer is None:
        return None
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"
