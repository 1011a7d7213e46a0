"""One log line per event, as `event key=value ...`, with the node and stream attached.

The record also carries the event's name and fields (`event_name`, `fields`), so the
process's log setup (controlplane/telemetry/logs.py) renders them as JSON keys.
Listeners get every event as (name, fields) as well, so a simulator or a test can follow
an agent without parsing its log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

Listener = Callable[[str, Mapping[str, object]], None]


def _value(value: object) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' "=\n\t'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def format_event(event: str, fields: Mapping[str, object]) -> str:
    parts = [event]
    parts += [f"{key}={_value(value)}" for key, value in fields.items() if value is not None]
    return " ".join(parts)


class EventLog:
    """Structured events with bound context (node, stream)."""

    def __init__(
        self,
        logger: logging.Logger,
        context: Mapping[str, object] | None = None,
        listeners: list[Listener] | None = None,
    ):
        self._logger = logger
        self.context: dict[str, object] = dict(context or {})
        # Shared with every bound copy, so a listener added later hears all of them.
        self.listeners: list[Listener] = listeners if listeners is not None else []

    def bind(self, **fields: object) -> EventLog:
        return EventLog(self._logger, {**self.context, **fields}, self.listeners)

    def set(self, **fields: object) -> None:
        """Change the bound context in place (the node id becomes known, a stream opens)."""
        self.context.update(fields)

    def emit(self, level: int, event: str, fields: Mapping[str, object], exc_info: bool = False) -> None:
        merged = {**self.context, **fields}
        for listener in self.listeners:
            listener(event, merged)
        if self._logger.isEnabledFor(level):
            self._logger.log(
                level,
                format_event(event, merged),
                exc_info=exc_info,
                extra={"event_name": event, "fields": merged},
            )

    def debug(self, event: str, **fields: object) -> None:
        self.emit(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: object) -> None:
        self.emit(logging.INFO, event, fields)

    def warning(self, event: str, **fields: object) -> None:
        self.emit(logging.WARNING, event, fields)

    def error(self, event: str, **fields: object) -> None:
        self.emit(logging.ERROR, event, fields)

    def exception(self, event: str, **fields: object) -> None:
        """An error with the current exception's traceback."""
        self.emit(logging.ERROR, event, fields, exc_info=True)
