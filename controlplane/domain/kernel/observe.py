"""The ids a log line carries, and spans around the server's own steps, without the
domain importing a logging or tracing library.

`bound(rollout_id=...)` (or `bind` for the rest of a task) puts ids in a context
variable that every log line of this task then carries (controlplane/telemetry/logs.py
reads it through the hook the composition root installs). `span(name, ...)` is a span
when tracing is on (controlplane/telemetry/tracing.py installs an OpenTelemetry tracer
with `install`) and a shared no-op otherwise: off costs one global read.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any

_IDS: ContextVar[Mapping[str, str] | None] = ContextVar("controlplane_log_ids", default=None)
_EMPTY: Mapping[str, str] = MappingProxyType({})

# An OpenTelemetry Tracer once tracing is on (typed Any: the domain imports no library),
# and how to say the current span's context as a W3C traceparent.
_tracer: Any = None
_traceparent: Callable[[], str] | None = None
_NOTHING = contextlib.nullcontext()


def ids() -> Mapping[str, str]:
    """The ids bound in this context (request, project, node, stream, rollout)."""
    return _IDS.get() or _EMPTY


def bind(**fields: str) -> None:
    """Bind ids for the rest of the current task (an RPC handler binds its request's)."""
    _IDS.set({**ids(), **{k: v for k, v in fields.items() if v}})


@contextlib.contextmanager
def bound(**fields: str) -> Iterator[None]:
    """Bind ids for the duration of a block."""
    token = _IDS.set({**ids(), **{k: v for k, v in fields.items() if v}})
    try:
        yield
    finally:
        _IDS.reset(token)


def install(tracer: Any, traceparent: Callable[[], str] | None = None) -> None:
    """Turn spans on (`tracer`: an OpenTelemetry Tracer), or off with None;
    `traceparent` gives the current span's context as a W3C traceparent."""
    global _tracer, _traceparent
    _tracer = tracer
    _traceparent = traceparent if tracer is not None else None


def traceparent() -> str:
    """The current span's context to store with a change; empty when tracing is off."""
    return _traceparent() if _traceparent is not None else ""


def tracing() -> bool:
    return _tracer is not None


def span(name: str, attributes: Mapping[str, Any] | None = None) -> contextlib.AbstractContextManager[Any]:
    """A span named `name` as a child of the current one (a no-op when tracing is off).

    Attributes are plain values (str, int, float, bool); ids bound with `bind` and
    `bound` are added as attributes too, so a span and the log lines inside it can be
    joined on them."""
    tracer = _tracer
    if tracer is None:
        return _NOTHING
    merged: dict[str, Any] = {f"controlplane.{k}": v for k, v in ids().items()}
    if attributes:
        merged.update(attributes)
    return tracer.start_as_current_span(name, attributes=merged)  # type: ignore[no-any-return]
