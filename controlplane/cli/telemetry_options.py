"""`controlplane serve` options for logs and traces, and the setup they drive
(docs/operations.md: Logs, Traces)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from controlplane.domain.kernel import observe
from controlplane.telemetry import logs, tracing

F = TypeVar("F", bound=Callable[..., Any])
# The options `setup` takes (and pops): what `serve --workers` hands each worker.
TELEMETRY_KEYS = ("log_format", "otlp_endpoint")

_OPTIONS = [
    click.option(
        "--log-format",
        type=click.Choice(logs.FORMATS),
        default="text",
        show_default=True,
        envvar="CONTROLPLANE_LOG_FORMAT",
        show_envvar=True,
        help="text: one `key=value` line per event; json: one object per line.",
    ),
    click.option(
        "--otlp-endpoint",
        default="",
        envvar="CONTROLPLANE_OTLP_ENDPOINT",
        show_envvar=True,
        help="Export traces over OTLP/gRPC to host:port (http:// or https:// for TLS); "
        "the OTEL_EXPORTER_OTLP_* variables also turn traces on. Off by default.",
    ),
]


def telemetry_options(command: F) -> F:
    for option in reversed(_OPTIONS):
        command = option(command)
    return command


def setup(options: dict[str, Any], level: str, service: str = "controlplane") -> tracing.Tracing:
    """Logs first (so a tracing error is logged), then traces; pops the options it used."""
    process = tracing.process_name()
    logs.setup(
        log_format=options.pop("log_format"),
        level=level,
        process=process,
        context=(observe.ids,),
        trace_ids=tracing.current_ids,
    )
    try:
        traces = tracing.setup(service, options.pop("otlp_endpoint"), process)
    except RuntimeError as e:
        raise click.ClickException(str(e)) from e
    observe.install(tracing.tracer(), tracing.traceparent)
    return traces
