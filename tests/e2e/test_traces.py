"""Traces, end to end, into a real OTLP/gRPC receiver: a caller's AssignBundle continues
the caller's trace into the server, its transaction and the hub's one span for the change;
each agent's apply is a trace of its own, linked to that span, and holds the server's
spans for the agent's DownloadBundle and ReportStatus calls. Every server span names the
serving process."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from controlplane.api.bundle.v1 import bundle_pb2
from tests.support.archives import bundle
from tests.support.otlp import OtlpReceiver, Span
from tests.support.processes import FAST_AGENT_ARGS, AgentProcess, ControlClient, ServerProcess

pytestmark = pytest.mark.e2e

# The caller's own trace: AssignBundle must continue it.
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
SERVER_SPAN = 2  # opentelemetry.proto.trace.v1.Span.SPAN_KIND_SERVER


@pytest.fixture
async def receiver(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[OtlpReceiver]:
    # Exported within a fifth of a second instead of every five: tests wait for spans.
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")
    r = await OtlpReceiver().start()
    try:
        yield r
    finally:
        await r.stop()


async def test_a_change_is_one_trace_from_the_caller_to_every_node(
    receiver: OtlpReceiver, tmp_path: Path
) -> None:
    spans = receiver.receiver
    server = ServerProcess(
        tmp_path / "server", extra_args=("--otlp-endpoint", receiver.endpoint, "--log-format", "json")
    )
    agents: list[AgentProcess] = []
    control: ControlClient | None = None
    try:
        await server.start()
        for name in ("edge-a", "edge-b"):
            agent = AgentProcess(
                server=server.address,
                token=server.token,
                state_dir=tmp_path / f"agent-{name}",
                name=name,
                labels={"env": "prod"},
                extra_args=(*FAST_AGENT_ARGS, "--otlp-endpoint", f"http://{receiver.endpoint}"),
            )
            agent.start()
            agents.append(agent)
        node_ids = {await a.wait_registered() for a in agents}
        control = ControlClient(server.address)
        digest = await control.upload(bundle({"main.kdl": b'listener "http"'}), version="v1")
        reply = await control.bundles.AssignBundle(
            bundle_pb2.AssignBundleRequest(
                project="default", target=bundle_pb2.Target(selector="env=prod"), digest=digest
            ),
            metadata=(*control.metadata, ("traceparent", f"00-{CALLER_TRACE}-{CALLER_SPAN}-01")),
            timeout=30,
        )
        for agent in agents:
            await agent.wait_current(digest)

        # The caller's trace continues into the server's span for AssignBundle ...
        (assign,) = await spans.wait_for(
            "controlplane.bundle.v1.BundleService/AssignBundle", lambda s: s.trace_id == CALLER_TRACE
        )
        assert assign.parent_id == CALLER_SPAN and assign.kind == SERVER_SPAN
        assert assign.attributes["rpc.system"] == "grpc"
        assert assign.attributes["rpc.method"] == "AssignBundle"
        assert assign.attributes["controlplane.project"] == "default"
        assert assign.attributes["controlplane.request_id"]
        assert assign.service == "controlplane"
        assert assign.instance.endswith(f"/{server.proc.pid}"), assign.instance  # type: ignore[union-attr]
        # ... its transaction, and the hub's one span for the change: not one per node.
        await spans.wait_for("db.transaction", lambda s: s.trace_id == CALLER_TRACE)
        changes = await spans.wait_for("controlplane.watch.change", lambda s: s.trace_id == CALLER_TRACE)
        assert len(changes) == 1, changes
        change = changes[0]
        assert change.attributes["controlplane.revision"] == reply.revision
        assert change.attributes["controlplane.streams"] == 2

        # Each node's apply is its own trace, linked to the change's span.
        applies = await spans.wait_for(
            "agent.apply", lambda s: (CALLER_TRACE, change.span_id) in s.links, count=2
        )
        assert {a.attributes["controlplane.node_id"] for a in applies} == node_ids
        assert all(a.service == "agent-stub" and a.parent_id == "" for a in applies)
        assert len({a.trace_id for a in applies}) == 2 and CALLER_TRACE not in {a.trace_id for a in applies}
        for apply in applies:
            # The server's spans of the apply's calls join the apply's trace.
            await spans.wait_for("controlplane.bundle.v1.BundleService/DownloadBundle", _child_of(apply))
            reports = await spans.wait_for(
                "controlplane.node.v1.NodeService/ReportStatus",
                _in_trace(apply),
                count=2,  # DOWNLOADED and ACTIVE
            )
            assert all(
                r.attributes["controlplane.node_id"] == apply.attributes["controlplane.node_id"]
                for r in reports
            )

        # The upload's pipeline stages and its blob store call, in the upload's trace.
        (upload,) = spans.named("controlplane.bundle.v1.BundleService/UploadBundle")
        stages = {s.name for s in spans.in_trace(upload.trace_id)}
        assert {"bundle.receive", "bundle.hash", "bundle.pack", "bundle.validate", "bundle.store"} <= stages
        assert {"blob.put", "bundle.sign", "db.transaction"} <= stages

        # Log lines are JSON and name the process; a call's lines carry its request id.
        lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
        assert lines and all(line["process"] == assign.instance for line in lines)
    finally:
        if control is not None:
            await control.close()
        for agent in agents:
            await agent.close()
        await server.close()
        print(server.log()[-3000:])


def _child_of(parent: Span) -> Callable[[Span], bool]:
    return lambda s: s.trace_id == parent.trace_id and s.parent_id == parent.span_id


def _in_trace(parent: Span) -> Callable[[Span], bool]:
    return lambda s: s.trace_id == parent.trace_id


def test_tracing_is_off_without_an_endpoint() -> None:
    from controlplane.telemetry import tracing

    assert not tracing.wanted("", {})
    assert tracing.wanted("127.0.0.1:4317", {})
    assert tracing.wanted("", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"})
    assert tracing.wanted("", {"OTEL_TRACES_EXPORTER": "otlp"})
    assert not tracing.wanted("127.0.0.1:4317", {"OTEL_SDK_DISABLED": "true"})
    assert not tracing.wanted("", {"OTEL_EXPORTER_OTLP_ENDPOINT": "x", "OTEL_TRACES_EXPORTER": "none"})
    assert os.environ.get("OTEL_SDK_DISABLED") != "true"
