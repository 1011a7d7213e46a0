"""The one log setup of server and agent: JSON or text lines, each naming the process
and the ids bound where it was written; the agent's events keep their names and fields."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from agent_stub.logs import EventLog
from controlplane.domain.kernel import observe
from controlplane.telemetry import logs


@pytest.fixture
def captured() -> Iterator[tuple[io.StringIO, list[logging.Handler]]]:
    out = io.StringIO()
    handlers: list[logging.Handler] = []
    yield out, handlers
    root = logging.getLogger()
    for handler in handlers:
        root.removeHandler(handler)
    root.setLevel(logging.WARNING)


def _setup(captured: tuple[io.StringIO, list[logging.Handler]], log_format: str) -> io.StringIO:
    out, handlers = captured
    handlers.append(
        logs.setup(
            log_format=log_format, level="INFO", process="host-1/42", context=(observe.ids,), stream=out
        )
    )
    return out


def test_json_lines_carry_the_process_and_the_bound_ids(
    captured: tuple[io.StringIO, list[logging.Handler]],
) -> None:
    out = _setup(captured, "json")
    with observe.bound(rollout_id="r-7", project="default"):
        logging.getLogger("controlplane.test").warning("step %d done", 3)
    logging.getLogger("controlplane.test").info("outside")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["event"] == "step 3 done" and first["level"] == "warning"
    assert (first["process"], first["rollout_id"], first["project"]) == ("host-1/42", "r-7", "default")
    assert first["logger"] == "controlplane.test" and first["timestamp"].endswith("Z")
    assert second["event"] == "outside" and "rollout_id" not in second


def test_agent_events_keep_their_name_and_fields(captured: tuple[io.StringIO, list[logging.Handler]]) -> None:
    out = _setup(captured, "json")
    events = EventLog(logging.getLogger("agent_stub"), {"node": "n-1"})
    events.set(stream="s-9")
    events.info("apply.start", revision=12, digest="sha256:ab")
    (line,) = (json.loads(x) for x in out.getvalue().splitlines())
    assert line["event"] == "apply.start"
    assert (line["node_id"], line["stream_id"], line["revision"]) == ("n-1", "s-9", 12)
    assert line["process"] == "host-1/42"


def test_text_lines_put_ids_first(captured: tuple[io.StringIO, list[logging.Handler]]) -> None:
    out = _setup(captured, "text")
    with observe.bound(request_id="req-1", node_id="n-2"):
        EventLog(logging.getLogger("agent_stub")).warning("report.failed", phase="ACTIVE", error="gone away")
    line = out.getvalue().strip()
    assert " WARNING host-1/42 agent_stub report.failed request_id=req-1 node_id=n-2 " in line, line
    assert line.endswith('error="gone away" phase=ACTIVE'), line


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="log format 'xml' is not one of text, json"):
        logs.setup(log_format="xml")
