"""The agent's side of a change's trace (docs/operations.md, Traces).

Each apply is a trace of its own, started when a DesiredState arrives and linked to the
control plane's span for the change (`DesiredState.trace_parent`): one query finds every
node's apply of one change, and a slow node's own trace says where its time went. The
calls made while applying (DownloadBundle, ReportStatus DOWNLOADED and ACTIVE) carry
the apply's context, so the server's spans for them join it. Whether a node's applies
are sampled is the node's choice (`OTEL_TRACES_SAMPLER`). Off, both hooks do nothing.
"""

from __future__ import annotations

import contextlib
from typing import Any

from controlplane.telemetry import tracing


def apply_span(
    trace_parent: str, node_id: str, revision: int, digest: str
) -> contextlib.AbstractContextManager[Any]:
    tracer = tracing.tracer()
    if tracer is None:
        return contextlib.nullcontext()
    from opentelemetry.context import Context
    from opentelemetry.trace import SpanKind

    return tracer.start_as_current_span(  # type: ignore[no-any-return]
        "agent.apply",
        # A root: an apply is the node's own trace, linked to (not inside) the change's.
        context=Context(),
        kind=SpanKind.CONSUMER,
        links=tracing.link_to(trace_parent),
        attributes={
            "controlplane.node_id": node_id,
            "controlplane.revision": revision,
            "controlplane.digest": digest,
        },
    )


def with_context(metadata: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """`metadata` plus the current span's traceparent, when there is one."""
    if not tracing.enabled():
        return metadata
    parent = tracing.traceparent()
    return (*metadata, (tracing.TRACEPARENT, parent)) if parent else metadata
