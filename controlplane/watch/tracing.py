"""One span per change the hub routes, never one per delivery.

A change is one revision. Its span continues the writer's trace (the row's
`trace_parent`, stored by whoever committed it, on whichever replica) and covers the
routing and queueing of that revision to every affected stream; the rows then carry
this span's context instead, so the DesiredState every node receives (now, or later
at a bootstrap) names the change's span, and each node's apply trace links to it
(docs/operations.md, Traces). Off, the hub never calls in here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from controlplane.domain.kernel import observe
from controlplane.domain.model.desired import DesiredRow
from controlplane.telemetry import tracing


class ChangeSpans:
    """The spans of one batch's changes, by revision."""

    def __init__(self, rows: Iterable[DesiredRow]):
        self.spans: dict[int, Any] = {}
        self.parents: dict[int, str] = {}
        self.rows: list[DesiredRow] = []
        tracer = tracing.tracer()
        for row in rows:
            if not row.trace_parent or tracer is None:
                self.rows.append(row)
                continue
            span = self.spans.get(row.revision)
            if span is None:
                span = self.spans[row.revision] = tracer.start_span(
                    "controlplane.watch.change",
                    context=tracing.context_from({tracing.TRACEPARENT: row.trace_parent}),
                    attributes={"controlplane.revision": row.revision, "controlplane.project": row.project},
                )
                self.parents[row.revision] = _traceparent_of(span)
            # Set in place: these rows are this batch's own, fresh from the feed and not in
            # the image yet, and a copy per row would cost more than delivering it.
            object.__setattr__(row, "trace_parent", self.parents[row.revision])
            self.rows.append(row)

    def end(self, affected: dict[Any, int]) -> None:
        """Close every span, with how many streams its revision went to."""
        if not self.spans:
            return
        streams: dict[int, int] = dict.fromkeys(self.spans, 0)
        for revision in affected.values():
            if revision in streams:
                streams[revision] += 1
        for revision, span in self.spans.items():
            span.set_attribute("controlplane.streams", streams[revision])
            span.end()


def changes(rows: list[DesiredRow]) -> ChangeSpans | None:
    """Spans for `rows`' changes, or None (nothing to do) when tracing is off."""
    if not observe.tracing() or not any(r.trace_parent for r in rows):
        return None
    return ChangeSpans(rows)


def _traceparent_of(span: Any) -> str:
    context = span.get_span_context()
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"
