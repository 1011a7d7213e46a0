"""One logging setup for the server and the agent: `text` (one line per event, `key=value`
fields) or `json` (one object per line), every line carrying the serving process and the
ids bound where it was written (request, project, node, stream, rollout).

Code keeps logging through the standard library (`logging.getLogger(__name__)`);
structlog's `ProcessorFormatter` renders every record, ours and libraries', the same way.
Ids come from context providers (`setup(context=...)`: the server passes the one its
interceptor and rollout driver bind through) and from a record's `fields` (the agent's
EventLog passes its node and stream there).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any, TextIO

import structlog

FORMATS = ("text", "json")

# The agent's EventLog names ids shortly (node=, stream=); JSON lines use one name each.
_RENAMED = {"node": "node_id", "stream": "stream_id"}
# The order ids come in on a text line, after the event.
_IDS = ("request_id", "project", "node_id", "stream_id", "rollout_id")

ContextProvider = Callable[[], Mapping[str, str]]


def setup(
    *,
    log_format: str = "text",
    level: str | int = "INFO",
    process: str = "",
    context: tuple[ContextProvider, ...] = (),
    trace_ids: Callable[[], tuple[str, str] | None] | None = None,
    stream: TextIO | None = None,
) -> logging.Handler:
    """Route every record of the root logger through one handler on `stream` (stderr).

    `process` names the serving process on every line; `context` providers add the ids
    bound where a record is written; `trace_ids` gives the current (trace id, span id)
    when tracing is on. Returns the handler (tests remove it)."""
    if log_format not in FORMATS:
        raise ValueError(f"log format {log_format!r} is not one of {', '.join(FORMATS)}")
    chain: list[Any] = [
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _Context(process, context, trace_ids),
    ]
    renderer: Any = structlog.processors.JSONRenderer() if log_format == "json" else _render_text
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=chain,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_controlplane", False)]:
        root.removeHandler(old)
    handler._controlplane = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    if root.level > logging.DEBUG:
        # asyncio's and grpc's own chatter is not ours to print at INFO.
        logging.getLogger("asyncio").setLevel(logging.WARNING)
    return handler


class _Context:
    """Adds the process, the bound ids, the record's own fields and the trace."""

    def __init__(
        self,
        process: str,
        providers: tuple[ContextProvider, ...],
        trace_ids: Callable[[], tuple[str, str] | None] | None,
    ):
        self._process = process
        self._providers = providers
        self._trace_ids = trace_ids

    def __call__(self, _logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        if self._process:
            event["process"] = self._process
        for provide in self._providers:
            for key, value in provide().items():
                event.setdefault(key, value)
        record = event.get("_record")
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            # An EventLog record: its event name and fields, not the preformatted text.
            event["event"] = getattr(record, "event_name", event["event"])
            for key, value in fields.items():
                if value is not None:
                    event[_RENAMED.get(str(key), str(key))] = value
        if self._trace_ids is not None:
            ids = self._trace_ids()
            if ids is not None:
                event["trace_id"], event["span_id"] = ids
        return event


_FIRST = ("timestamp", "level", "process", "logger", "event")


def _render_text(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> str:
    """`time level process logger event key=value ...`: ids first, then the rest."""
    head = [str(event.pop(key, "")) for key in _FIRST]
    head[1] = head[1].upper()
    exc = event.pop("exception", None)
    parts = [" ".join(p for p in head if p)]
    for key in (*_IDS, *sorted(k for k in event if k not in _IDS)):
        if key in event:
            parts.append(f"{key}={_value(event[key])}")
    line = " ".join(parts)
    return f"{line}\n{exc}" if exc else line


def _value(value: object) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' "=\n\t'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text
