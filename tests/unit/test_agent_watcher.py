"""The agent against a scripted gRPC control plane: reconnects, liveness, error classes,
resume cursor, downloads, heartbeats.

The fake server runs on loopback in-process; each WatchBundles call plays the next script
so a test decides exactly how every stream behaves.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent_stub.agent import Agent
from agent_stub.applier import Downloaded, Target
from agent_stub.backoff import BackoffPolicy
from agent_stub.config import AgentConfig
from agent_stub.download import Downloader
from agent_stub.errors import ApplyFailed, TransientFailure
from agent_stub.heartbeat import MetricsError, parse_metrics
from agent_stub.simulator import MetricsProfile
from agent_stub.state import Cursor, Identity, MemoryStateStore
from controlplane.api.bundle.v1 import bundle_pb2
from controlplane.api.node.v1 import node_pb2
from controlplane.api.watch.v1 import watch_pb2 as pb
from tests.support.archives import bundle
from tests.support.eventually import eventually

Script = Callable[[pb.WatchBundlesRequest, Any], Awaitable[None]]
A = "sha256:" + "a" * 64


async def hang(request: pb.WatchBundlesRequest, context: Any) -> None:
    await asyncio.Event().wait()


def events(*items: pb.WatchEvent) -> pb.WatchBundlesResponse:
    return pb.WatchBundlesResponse(events=list(items))


def started(mode: Any = pb.STREAM_MODE_BOOTSTRAP, stream: str = "s1", epoch: str = "e1") -> pb.WatchEvent:
    return pb.WatchEvent(started=pb.StreamStarted(stream_id=stream, epoch=epoch, mode=mode))


def bootstrap(revision: int, digest: str = "", then: Script = hang) -> Script:
    async def play(request: pb.WatchBundlesRequest, context: Any) -> None:
        await context.write(
            events(
                started(),
                pb.WatchEvent(desired=pb.DesiredState(revision=revision, digest=digest)),
                pb.WatchEvent(snapshot_end=pb.SnapshotEnd(revision=revision)),
            )
        )
        await then(request, context)

    return play


def fail(code: Any, details: str = "scripted", retry_after_ms: int | None = None) -> Script:
    async def play(request: pb.WatchBundlesRequest, context: Any) -> None:
        if retry_after_ms is not None:
            context.set_trailing_metadata((("retry-after-ms", str(retry_after_ms)),))
        await context.abort(code, details)

    return play


def closing(revision: int) -> Script:
    async def play(request: pb.WatchBundlesRequest, context: Any) -> None:
        await context.write(
            events(
                started(pb.STREAM_MODE_RESUME),
                pb.WatchEvent(bookmark=pb.Bookmark(revision=revision, closing=True)),
            )
        )

    return play


class FakeControlPlane:
    def __init__(self) -> None:
        self.watch_script: list[Script] = []
        self.watch_calls: list[tuple[pb.WatchBundlesRequest, dict[str, str]]] = []
        self.registrations: list[node_pb2.RegisterNodeRequest] = []
        self.reports: list[node_pb2.ReportStatusRequest] = []
        self.heartbeats: list[tuple[node_pb2.HeartbeatRequest, dict[str, str]]] = []
        self.heartbeat_interval = 1
        self.download: Callable[[bundle_pb2.DownloadBundleRequest, Any], Awaitable[None]] | None = None
        self.server: Any = None
        self.address = ""

    async def start(self, port: int = 0) -> None:
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers(
            [
                grpc.method_handlers_generic_handler(
                    "controlplane.watch.v1.WatchService",
                    {
                        "WatchBundles": grpc.unary_stream_rpc_method_handler(
                            self._watch,
                            request_deserializer=pb.WatchBundlesRequest.FromString,
                            response_serializer=pb.WatchBundlesResponse.SerializeToString,
                        )
                    },
                ),
                grpc.method_handlers_generic_handler(
                    "controlplane.node.v1.NodeService",
                    {
                        "RegisterNode": grpc.unary_unary_rpc_method_handler(
                            self._register,
                            request_deserializer=node_pb2.RegisterNodeRequest.FromString,
                            response_serializer=node_pb2.RegisterNodeResponse.SerializeToString,
                        ),
                        "ReportStatus": grpc.unary_unary_rpc_method_handler(
                            self._report,
                            request_deserializer=node_pb2.ReportStatusRequest.FromString,
                            response_serializer=node_pb2.ReportStatusResponse.SerializeToString,
                        ),
                        "Heartbeat": grpc.unary_unary_rpc_method_handler(
                            self._heartbeat,
                            request_deserializer=node_pb2.HeartbeatRequest.FromString,
                            response_serializer=node_pb2.HeartbeatResponse.SerializeToString,
                        ),
                    },
                ),
                grpc.method_handlers_generic_handler(
                    "controlplane.bundle.v1.BundleService",
                    {
                        "DownloadBundle": grpc.unary_stream_rpc_method_handler(
                            self._download,
                            request_deserializer=bundle_pb2.DownloadBundleRequest.FromString,
                            response_serializer=bundle_pb2.DownloadBundleResponse.SerializeToString,
                        )
                    },
                ),
            ]
        )
        port = self.server.add_insecure_port(f"127.0.0.1:{port}")
        self.address = f"127.0.0.1:{port}"
        await self.server.start()

    async def stop(self) -> None:
        await self.server.stop(grace=None)

    async def _watch(self, request: pb.WatchBundlesRequest, context: Any) -> None:
        self.watch_calls.append((request, dict(context.invocation_metadata())))
        script = self.watch_script.pop(0) if self.watch_script else hang
        await script(request, context)

    async def _register(
        self, request: node_pb2.RegisterNodeRequest, context: Any
    ) -> node_pb2.RegisterNodeResponse:
        self.registrations.append(request)
        n = len(self.registrations)
        return node_pb2.RegisterNodeResponse(
            node_id="n-1", node_credential=f"n-1.cred{n}", project=request.project
        )

    async def _report(
        self, request: node_pb2.ReportStatusRequest, context: Any
    ) -> node_pb2.ReportStatusResponse:
        self.reports.append(request)
        return node_pb2.ReportStatusResponse()

    async def _heartbeat(
        self, request: node_pb2.HeartbeatRequest, context: Any
    ) -> node_pb2.HeartbeatResponse:
        self.heartbeats.append((request, dict(context.invocation_metadata())))
        return node_pb2.HeartbeatResponse(interval_seconds=self.heartbeat_interval)

    async def _download(self, request: bundle_pb2.DownloadBundleRequest, context: Any) -> None:
        assert self.download is not None
        await self.download(request, context)

    async def wait_watch_calls(self, count: int, timeout: float = 10.0) -> None:
        async def check() -> None:
            assert len(self.watch_calls) >= count, f"{len(self.watch_calls)} watch calls"

        await eventually(check, timeout=timeout, what=f"{count} watch calls")


class NullInstaller:
    def __init__(self) -> None:
        self.active = ""

    def active_digest(self) -> str:
        return self.active

    async def reweight(self, target: Target, node_id: str) -> None:
        return None

    async def install(self, target: Target, node_id: str, downloaded: Downloaded) -> None:
        await downloaded()
        self.active = target.digest


@pytest.fixture
async def plane() -> AsyncIterator[FakeControlPlane]:
    fake = FakeControlPlane()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def channel(plane: FakeControlPlane) -> AsyncIterator[Any]:
    ch = grpc.aio.insecure_channel(plane.address)
    yield ch
    await ch.close()


FAST = BackoffPolicy(base=0.05, cap=0.4, reset_after=120.0)


class Running:
    """An in-process agent on a shared channel, with its events recorded."""

    def __init__(self, agent: Agent):
        self.agent = agent
        self.events: list[tuple[str, dict[str, object]]] = []
        agent.on_event(lambda name, fields: self.events.append((name, dict(fields))))
        self.task = asyncio.get_running_loop().create_task(agent.run())

    def named(self, name: str) -> list[dict[str, object]]:
        return [fields for event, fields in self.events if event == name]

    async def wait_event(self, name: str, count: int = 1, timeout: float = 10.0) -> list[dict[str, object]]:
        async def check() -> list[dict[str, object]]:
            found = self.named(name)
            assert len(found) >= count, f"{name}: {len(found)} of {count}; saw {[e for e, _ in self.events]}"
            return found

        return await eventually(check, timeout=timeout, what=name)

    async def stop(self) -> None:
        self.agent.stop()
        await asyncio.wait_for(self.task, 10)


@pytest.fixture
async def start_agent(channel: Any) -> AsyncIterator[Callable[..., Running]]:
    running: list[Running] = []

    def start(
        state: MemoryStateStore | None = None,
        installer: Any = None,
        liveness: float = 5.0,
        backoff: BackoffPolicy = FAST,
        metrics: Any = None,
        **config: Any,
    ) -> Running:
        cfg = AgentConfig(
            server="unused",
            project="default",
            token="enroll",
            labels={"env": "prod"},
            name="edge-1",
            liveness_timeout=liveness,
            backoff=backoff,
            heartbeat_interval=0.2,
            **config,
        )
        agent = Agent(
            cfg,
            channel=channel,
            state=state or MemoryStateStore(),
            installer=installer or NullInstaller(),
            metrics=metrics,
            logger=logging.getLogger("test.agent"),
        )
        run = Running(agent)
        running.append(run)
        return run

    yield start
    for run in running:
        if not run.task.done():
            await run.stop()


# -- the watch loop ---------------------------------------------------------------------


async def test_bootstrap_then_resume_from_the_persisted_cursor(
    plane: FakeControlPlane, start_agent: Callable[..., Running]
) -> None:
    plane.watch_script = [bootstrap(5, A, then=fail(grpc.StatusCode.UNAVAILABLE, "going away"))]
    state = MemoryStateStore()
    run = start_agent(state=state)
    await plane.wait_watch_calls(2)
    first, second = plane.watch_calls[0][0], plane.watch_calls[1][0]
    assert (first.since_revision, first.epoch) == (0, "")
    assert (second.since_revision, second.epoch) == (5, "e1")
    assert state.cursor.applied_digest == A
    assert plane.watch_calls[1][1]["authorization"] == "Bearer n-1.cred1"
    assert [r.phase for r in plane.reports] == [
        node_pb2.REPORT_PHASE_DOWNLOADED,
        node_pb2.REPORT_PHASE_ACTIVE,
    ]
    assert all(r.stream_id == "s1" and r.revision == 5 for r in plane.reports)
    await run.stop()


async def test_liveness_deadline_cancels_a_silent_stream(
    plane: FakeControlPlane, start_agent: Callable[..., Running]
) -> None:
    # First stream: never a single message (a server stalled accepting calls).
    # Second: bootstraps, then goes silent. Both must be abandoned and retried.
    plane.watch_script = [hang, bootstrap(3)]
    run = start_agent(liveness=0.3)
    await plane.wait_watch_calls(3)
    ended = await run.wait_event("stream.ended", 2)
    assert all("liveness deadline" in str(e["reason"]) for e in ended[:2])
    assert plane.watch_calls[2][0].since_revision == 3
    await run.stop()


async def test_closing_bookmark_reconnects_at_once_from_its_revision(
    plane: FakeControlPlane, start_agent: Callable[..., Running]
) -> None:
    state = MemoryStateStore(
        identity=Identity("n-1", "n-1.saved", "default", "edge-1", {"env": "prod"}),
        cursor=Cursor(revision=4, epoch="e1", node_id="n-1"),
    )
    plane.watch_script = [closing(9)]
    run = start_agent(state=state)
    await plane.wait_watch_calls(2)
    assert plane.watch_calls[1][0].since_revision == 9
    await run.wait_event("stream.rotate")
    assert run.named("reconnect.wait") == []
    assert run.agent.backoff.failures == 0
    assert plane.registrations == [], "a saved identity is reused"
    await run.stop()


async def test_retry_after_hint_is_honoured(
    plane: FakeControlPlane, start_agent: Callable[..., Running]
) -> None:
    plane.watch_script = [
        fail(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many streams opening", retry_after_ms=700)
    ]
    run = start_agent()
    await plane.wait_watch_calls(2)
    (ended,) = run.named("stream.ended")[:1]
    assert ended["retry_after"] == "0.70"
    waits = run.named("reconnect.wait")
    assert float(str(waits[0]["delay"])) >= 0.7
    await run.stop()


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED]
)
async def test_retryable_errors_before_the_first_message_back_off_and_retry(
    plane: FakeControlPlane, start_agent: Callable[..., Running], code: Any
) -> None:
    plane.watch_script = [fail(code), fail(code), fail(code), bootstrap(2)]
    run = start_agent()
    await plane.wait_watch_calls(4)
    ended = run.named("stream.ended")
    assert len(ended) >= 3
    assert all(e.get("short_lived") is True for e in ended[:3])
    await run.wait_event("snapshot.end")
    # Three short-lived failures in a row grew the backoff; the good stream did not reset it
    # (it has not been healthy for two minutes).
    assert run.agent.backoff.failures == 3
    await run.stop()


async def test_unauthenticated_registers_again_once(
    plane: FakeControlPlane, start_agent: Callable[..., Running]
) -> None:
    state = MemoryStateStore(identity=Identity("n-1", "n-1.stale", "default", "edge-1", {"env": "prod"}))
    plane.watch_script = [fail(grpc.StatusCode.UNAUTHENTICATED, "node credential is not valid"), bootstrap(2)]
    run = start_agent(state=state)
    await plane.wait_watch_calls(2)
    assert plane.watch_calls[0][1]["authorization"] == "Bearer n-1.stale"
    assert plane.watch_calls[1][1]["authorization"] == "Bearer n-1.cred1"
    assert len(plane.registrations) == 1
    assert state.identity is not None and state.identity.credential == "n-1.cred1"
    await run.stop()


async def test_repeated_unauthenticated_backs_off_at_the_cap(
    plane: FakeControlPlane, start_agent: Callable[..., Running]
) -> None:
    plane.watch_script = [fail(grpc.StatusCode.UNAUTHENTICATED), fail(grpc.StatusCode.UNAUTHENTICATED), hang]
    run = start_agent(backoff=BackoffPolicy(base=0.05, cap=0.3))
    await plane.wait_watch_calls(3)
    loud = await run.wait_event("stream.unauthenticated", 2)
    assert "refused again" in str(loud[1]["detail"])
    # Registered at start and once more for the first refusal; the second refusal waited
    # at the cap instead and retried with the same credential.
    assert len(plane.registrations) == 2
    assert plane.watch_calls[2][1]["authorization"] == plane.watch_calls[1][1]["authorization"]
    assert float(str(run.named("reconnect.wait")[-1]["delay"])) >= 0.15
    await run.stop()


@pytest.mark.parametrize("code", [grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT])
async def test_refused_requests_are_loud_and_wait_at_the_cap(
    plane: FakeControlPlane, start_agent: Callable[..., Running], code: Any
) -> None:
    plane.watch_script = [fail(code, "node n-1 cannot act for node 'x'")]
    policy = BackoffPolicy(base=0.01, cap=0.4)
    run = start_agent(backoff=policy)
    await plane.wait_watch_calls(2)
    (refused,) = run.named("stream.refused")[:1]
    assert "cannot act for node" in str(refused["reason"])
    assert float(str(run.named("reconnect.wait")[0]["delay"])) >= policy.cap / 2
    await run.stop()


async def test_stop_ends_run_while_streaming(
    plane: FakeControlPlane, start_agent: Callable[..., Running]
) -> None:
    plane.watch_script = [bootstrap(1)]
    run = start_agent()
    await run.wait_event("snapshot.end")
    assert run.agent.connected.is_set()
    await run.stop()
    assert run.task.done() and run.task.exception() is None
    await run.wait_event("agent.stop")


# -- heartbeats ---------------------------------------------------------------------------


async def test_heartbeats_carry_metrics_file_and_applied_digest(
    plane: FakeControlPlane, start_agent: Callable[..., Running], tmp_path: Path
) -> None:
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"health": "degraded", "error_rate": 0.25, "p99_latency_ms": 80}))
    installer = NullInstaller()
    installer.active = A
    plane.watch_script = [bootstrap(1)]
    run = start_agent(installer=installer, metrics_file=metrics)

    async def beats(count: int) -> None:
        assert len(plane.heartbeats) >= count

    await eventually(lambda: beats(1), what="first heartbeat")
    request, metadata = plane.heartbeats[0]
    assert request.node_id == "n-1"
    assert metadata["authorization"] == "Bearer n-1.cred1"
    assert request.applied_digest == A
    assert request.metrics.health == node_pb2.HEALTH_STATUS_DEGRADED
    assert request.metrics.error_rate == 0.25
    # What the file leaves out is absent from the beat, not 0.0.
    assert reported(request.metrics) == {"error_rate": 0.25, "p99_latency_ms": 80.0}
    # The file is read again on every beat.
    metrics.write_text(json.dumps({"health": "unhealthy", "cpu_percent": 99}))
    seen = len(plane.heartbeats)

    async def updated() -> None:
        assert any(h.metrics.health == node_pb2.HEALTH_STATUS_UNHEALTHY for h, _ in plane.heartbeats[seen:])

    await eventually(updated, what="heartbeat with new metrics")
    last = plane.heartbeats[-1][0].metrics
    assert reported(last) == {"cpu_percent": 99.0}
    await run.stop()


def reported(m: node_pb2.NodeMetrics) -> dict[str, float]:
    """The metric values a beat carries (fields with presence that are set)."""
    return {f.name: v for f, v in m.ListFields() if f.name != "health"}


async def test_without_a_metrics_source_heartbeats_claim_nothing(
    plane: FakeControlPlane, start_agent: Callable[..., Running]
) -> None:
    """No metrics file and no metrics source: the node does not know its health, so it
    says UNSPECIFIED and reports no metric, rather than a healthy node with zero errors."""
    plane.watch_script = [bootstrap(1)]
    run = start_agent()

    async def beat() -> None:
        assert plane.heartbeats

    await eventually(beat, what="a heartbeat")
    sent = plane.heartbeats[0][0]
    assert sent.HasField("metrics")
    assert sent.metrics.health == node_pb2.HEALTH_STATUS_UNSPECIFIED
    assert reported(sent.metrics) == {} and not sent.metrics.HasField("error_rate")
    await run.stop()


def test_simulated_metrics_are_full_by_default_and_can_omit_values() -> None:
    rng = random.Random(1)
    full = MetricsProfile().sample(rng)
    assert full.health == node_pb2.HEALTH_STATUS_HEALTHY
    assert set(reported(full)) == {
        "error_rate",
        "p99_latency_ms",
        "cpu_percent",
        "memory_percent",
        "requests_per_second",
    }
    partial = MetricsProfile.parse("error_rate=none,health=degraded,p99=900").sample(rng)
    assert partial.health == node_pb2.HEALTH_STATUS_DEGRADED and not partial.HasField("error_rate")
    assert 800 < partial.p99_latency_ms < 1000
    silent = MetricsProfile.silent().sample(rng)
    assert silent.health == node_pb2.HEALTH_STATUS_UNSPECIFIED and reported(silent) == {}
    assert MetricsProfile.parse("health=none").sample(rng).health == node_pb2.HEALTH_STATUS_UNSPECIFIED
    with pytest.raises(ValueError, match="health"):
        MetricsProfile.parse("health=fine")


def test_metrics_file_contents() -> None:
    """Fields left out or null are absent; health left out is UNSPECIFIED; a bad field is
    dropped alone (tests/unit/test_agent_metrics.py); only a non-object is refused (the
    agent then sends no metrics, with a warning)."""
    m, dropped = parse_metrics({"health": "healthy", "error_rate": 0, "p99_latency_ms": None})
    assert m.health == node_pb2.HEALTH_STATUS_HEALTHY and dropped == []
    assert reported(m) == {"error_rate": 0.0} and m.HasField("error_rate")
    assert not m.HasField("p99_latency_ms") and not m.HasField("requests_per_second")
    bare, _ = parse_metrics({"cpu_percent": 12.5})
    assert bare.health == node_pb2.HEALTH_STATUS_UNSPECIFIED and reported(bare) == {"cpu_percent": 12.5}
    partly, dropped = parse_metrics({"health": "fine", "error_rate": "low", "cpu_percent": 3})
    assert partly.health == node_pb2.HEALTH_STATUS_UNSPECIFIED and reported(partly) == {"cpu_percent": 3.0}
    assert [d.field for d in dropped] == ["health", "error_rate"]
    refused: list[Any] = [[], "healthy", 0.5, None]
    for bad in refused:
        with pytest.raises(MetricsError, match="JSON object"):
            parse_metrics(bad)


async def test_heartbeat_failure_is_not_fatal(
    plane: FakeControlPlane, start_agent: Callable[..., Running], tmp_path: Path
) -> None:
    metrics = tmp_path / "metrics.json"
    metrics.write_text("{not json")
    plane.watch_script = [bootstrap(1)]
    run = start_agent(metrics_file=metrics)
    await run.wait_event("heartbeat.metrics_unreadable")

    async def beat() -> None:
        assert plane.heartbeats

    await eventually(beat, what="heartbeat without metrics")
    # An unreadable file is no data: health unknown and no value, never made-up zeros.
    sent = plane.heartbeats[0][0].metrics
    assert sent.health == node_pb2.HEALTH_STATUS_UNSPECIFIED and reported(sent) == {}
    await run.stop()


# -- downloads ----------------------------------------------------------------------------


def _downloader(channel: Any, max_bytes: int = 10_000_000, read_timeout: float = 5.0) -> Downloader:
    return Downloader(
        channel,
        lambda: "default",
        lambda: (("authorization", "Bearer n-1.x"),),
        max_bytes,
        read_timeout,
        fsync=False,
    )


def serve_bytes(
    data: bytes, chunk: int = 1000, announce: int | None = None
) -> Callable[..., Awaitable[None]]:
    async def play(request: bundle_pb2.DownloadBundleRequest, context: Any) -> None:
        for i, offset in enumerate(range(0, len(data), chunk)):
            size = (announce if announce is not None else len(data)) if i == 0 else 0
            await context.write(
                bundle_pb2.DownloadBundleResponse(chunk=data[offset : offset + chunk], size_bytes=size)
            )

    return play


async def test_download_verifies_the_digest(plane: FakeControlPlane, channel: Any, tmp_path: Path) -> None:
    data = bundle({"main.kdl": b"v1"})
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    plane.download = serve_bytes(data)
    dest = tmp_path / "a.tar.zst"
    assert await _downloader(channel)(digest, dest) == len(data)
    assert dest.read_bytes() == data

    with pytest.raises(ApplyFailed, match="digest mismatch"):
        await _downloader(channel)(A, dest)


async def test_download_enforces_the_size_limit(
    plane: FakeControlPlane, channel: Any, tmp_path: Path
) -> None:
    data = b"x" * 5000
    plane.download = serve_bytes(data, announce=5000)
    with pytest.raises(ApplyFailed, match="over this node's limit of 4000"):
        await _downloader(channel, max_bytes=4000)(A, tmp_path / "a")
    # A server that understates the size is caught as the bytes arrive.
    plane.download = serve_bytes(data, announce=10)
    with pytest.raises(ApplyFailed, match="exceeds this node's limit of 4000"):
        await _downloader(channel, max_bytes=4000)(A, tmp_path / "a")


async def test_download_not_found_is_a_nack(plane: FakeControlPlane, channel: Any, tmp_path: Path) -> None:
    async def missing(request: Any, context: Any) -> None:
        await context.abort(grpc.StatusCode.NOT_FOUND, "bundle does not exist")

    plane.download = missing
    with pytest.raises(ApplyFailed, match="NOT_FOUND"):
        await _downloader(channel)(A, tmp_path / "a")


async def test_download_broken_midway_is_transient(
    plane: FakeControlPlane, channel: Any, tmp_path: Path
) -> None:
    async def broken(request: Any, context: Any) -> None:
        await context.write(bundle_pb2.DownloadBundleResponse(chunk=b"x" * 100, size_bytes=1000))
        context.set_trailing_metadata((("retry-after-ms", "1500"),))
        await context.abort(grpc.StatusCode.UNAVAILABLE, "server shutting down")

    plane.download = broken
    with pytest.raises(TransientFailure) as caught:
        await _downloader(channel)(A, tmp_path / "a")
    assert caught.value.code == "UNAVAILABLE"
    assert caught.value.retry_after == 1.5


async def test_download_stall_is_transient(plane: FakeControlPlane, channel: Any, tmp_path: Path) -> None:
    async def stall(request: Any, context: Any) -> None:
        await context.write(bundle_pb2.DownloadBundleResponse(chunk=b"x", size_bytes=10))
        await asyncio.Event().wait()

    plane.download = stall
    with pytest.raises(TransientFailure, match="stalled"):
        await _downloader(channel, read_timeout=0.3)(A, tmp_path / "a")


async def test_transient_download_failure_resumes_without_nack(
    plane: FakeControlPlane, start_agent: Callable[..., Running], tmp_path: Path
) -> None:
    """Through the whole agent: the stream is abandoned and the cursor stays put."""
    data = bundle({"main.kdl": b"v1"})
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    attempts = 0

    async def flaky(request: Any, context: Any) -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "blip")
        await serve_bytes(data)(request, context)

    plane.download = flaky
    plane.watch_script = [bootstrap(4, digest), bootstrap(4, digest)]
    cfg_state = MemoryStateStore()
    channel = grpc.aio.insecure_channel(plane.address)
    agent = Agent(
        AgentConfig(
            server="unused",
            project="default",
            token="t",
            state_dir=tmp_path / "state",
            name="edge-1",
            backoff=FAST,
            apply_command="true",
            fsync=False,
            verify_bundles=False,  # this scripted server signs nothing
        ),
        channel=channel,
        state=cfg_state,
    )
    run = Running(agent)
    try:
        await run.wait_event("apply.active")
        assert len(plane.watch_calls) == 2
        assert plane.watch_calls[1][0].since_revision == 0, "nothing was durably applied before"
        assert [r.phase for r in plane.reports if r.phase == node_pb2.REPORT_PHASE_FAILED] == []
        assert cfg_state.cursor.revision == 4
        assert agent.active_digest == digest
    finally:
        await run.stop()
        await channel.close()


async def test_local_errors_never_end_the_agent(
    plane: FakeControlPlane, start_agent: Callable[..., Running]
) -> None:
    class BrokenDisk(MemoryStateStore):
        def __init__(self) -> None:
            super().__init__()
            self.refusals = 2

        def save_identity(self, identity: Identity) -> None:
            if self.refusals:
                self.refusals -= 1
                raise OSError(28, "No space left on device")
            super().save_identity(identity)

    async def broken_metrics() -> node_pb2.NodeMetrics:
        raise RuntimeError("sensor unplugged")

    plane.watch_script = [bootstrap(1)]
    run = start_agent(state=BrokenDisk(), metrics=broken_metrics)
    errors = await run.wait_event("watch.error", 2)
    assert "No space left" in str(errors[0]["error"])
    await run.wait_event("snapshot.end")
    [warned] = await run.wait_event("heartbeat.metrics_unreadable")
    assert "sensor unplugged" in str(warned["error"])

    # A failing metrics source costs the metrics, not the beat (the node's liveness).
    async def beat() -> None:
        assert plane.heartbeats

    await eventually(beat, what="a heartbeat without metrics")
    sent = plane.heartbeats[0][0].metrics
    assert sent.health == node_pb2.HEALTH_STATUS_UNSPECIFIED and reported(sent) == {}
    assert not run.task.done()
    await run.stop()
