"""Rollout tests over real gRPC: a control plane (in-process harness or process), a
simulated fleet of real agents, and a RolloutService client that follows WatchRollout."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.duration_pb2 import Duration

from agent_stub.backoff import BackoffPolicy
from agent_stub.simulator import FleetConfig, FleetSimulator, MetricsProfile
from controlplane.api.node.v1 import node_pb2
from controlplane.api.rollout.v1 import drift_pb2_grpc, rollout_pb2, rollout_pb2_grpc
from controlplane.bootstrap import App
from controlplane.domain.drift import SweepResult
from controlplane.domain.rollouts.driver import PassResult
from tests.support.archives import bundle
from tests.support.clock import TestClock
from tests.support.harness import Harness
from tests.support.processes import FAST_AGENT_ARGS

pb = rollout_pb2
TERMINAL = {
    pb.ROLLOUT_STATE_SUCCEEDED,
    pb.ROLLOUT_STATE_CANCELLED,
    pb.ROLLOUT_STATE_ROLLED_BACK,
    pb.ROLLOUT_STATE_REJECTED,
}
# Harness settings for rollout tests: beats every second, offline after three missed,
# a driver that looks ten times a second.
FAST = {
    "heartbeat_interval": timedelta(seconds=1),
    "offline_after": timedelta(seconds=3),
    "offline_sweep_interval": timedelta(seconds=0.5),
    "rollout_tick": timedelta(seconds=0.1),
    "drift_interval": timedelta(seconds=0.5),
    "drift_grace": timedelta(seconds=2),
    "lease_ttl": timedelta(seconds=3),
}

# FAST, but nodes go offline, and heartbeats go stale, only after a day: for a server on
# a TestClock (tests/support/clock.py) that the test moves past bakes, schedules and
# failure windows instead of waiting for them.
STEADY = {**FAST, "offline_after": timedelta(days=1)}

# The same for a server process (e2e): `@pytest.mark.server_args(*SERVER_ARGS)`.
SERVER_ARGS = ("--rollout-tick", "0.1", "--lease-ttl", "3", "--offline-after", "3")


# What a healthy proxy reports through an agent's --metrics-file.
HEALTHY_METRICS = {"health": "healthy", "error_rate": 0.001, "p99_latency_ms": 30.0}


def metrics_file_args(path: Path, metrics: Mapping[str, Any] = HEALTHY_METRICS) -> tuple[str, ...]:
    """Agent flags (the fast ones plus `--metrics-file`) with `metrics` written to `path`.
    A real agent under gated rollouts needs a metrics source: without one it reports no
    health and no metric, and every gate fails on it (docs/agent.md)."""
    path.write_text(json.dumps(metrics))
    return (*FAST_AGENT_ARGS, "--metrics-file", str(path))


def seconds(value: float) -> Duration:
    d = Duration()
    d.FromTimedelta(timedelta(seconds=value))
    return d


def fleet(
    address: str, token: str, nodes: int, labels: dict[str, str] | None = None, **kwargs: Any
) -> FleetSimulator:
    config = FleetConfig(
        server=address,
        project="default",
        token=token,
        nodes=nodes,
        labels=labels or {"env": "prod"},
        heartbeat_interval=1.0,
        liveness_timeout=5.0,
        backoff=BackoffPolicy(base=0.1, cap=1.0),
        seed=7,
        **kwargs,
    )
    return FleetSimulator(config)


@asynccontextmanager
async def running(sim: FleetSimulator) -> AsyncIterator[FleetSimulator]:
    await sim.start()
    try:
        await sim.wait_registered(30)
        yield sim
    finally:
        await sim.stop()


def archive(tag: str) -> bytes:
    """A valid bundle whose bytes (and so digest) depend on `tag`."""
    return bundle({"main.kdl": b"listen 8080\n", "routes.kdl": f'route "/" upstream="{tag}"\n'.encode()})


@dataclass
class Watched:
    """Everything one WatchRollout stream delivered."""

    snapshot: pb.Rollout | None = None
    events: list[pb.RolloutEvent] = field(default_factory=list)
    states: list[int] = field(default_factory=list)
    progress: list[pb.Progress] = field(default_factory=list)

    @property
    def last_state(self) -> int:
        return self.states[-1] if self.states else pb.ROLLOUT_STATE_UNSPECIFIED

    def messages(self, kind: str) -> list[str]:
        return [e.message for e in self.events if e.kind == kind]


class Rollouts:
    def __init__(
        self, channel: grpc.aio.Channel, project: str = "default", metadata: Sequence[tuple[str, str]] = ()
    ):
        self.stub = rollout_pb2_grpc.RolloutServiceStub(_Authorized(channel, tuple(metadata)))
        self.drift = drift_pb2_grpc.DriftServiceStub(_Authorized(channel, tuple(metadata)))
        self.project = project

    async def create(self, digest: str, selector: str = "env=prod", **fields: Any) -> pb.Rollout:
        fields.setdefault("bake_time", seconds(0))
        fields.setdefault("strategy", pb.STRATEGY_ROLLING)
        if fields["strategy"] == pb.STRATEGY_ROLLING:
            fields.setdefault("rolling", pb.RollingParams(batch_size=2))
        reply = await self.stub.CreateRollout(
            pb.CreateRolloutRequest(project=self.project, bundle_digest=digest, selector=selector, **fields)
        )
        return reply.rollout

    async def get(self, rollout_id: str) -> pb.Rollout:
        return (
            await self.stub.GetRollout(pb.GetRolloutRequest(project=self.project, rollout_id=rollout_id))
        ).rollout

    async def nodes(self, rollout_id: str) -> list[pb.RolloutNode]:
        reply = await self.stub.ListRolloutNodes(
            pb.ListRolloutNodesRequest(project=self.project, rollout_id=rollout_id, page_size=1000)
        )
        return list(reply.nodes)

    async def events(self, rollout_id: str) -> list[pb.RolloutEvent]:
        out: list[pb.RolloutEvent] = []
        while True:
            reply = await self.stub.ListRolloutEvents(
                pb.ListRolloutEventsRequest(
                    project=self.project,
                    rollout_id=rollout_id,
                    after_seq=out[-1].seq if out else 0,
                    page_size=1000,
                )
            )
            out += reply.events
            if len(reply.events) < 1000:
                return out

    async def watch(self, rollout_id: str, timeout: float = 60.0, until: Sequence[int] = ()) -> Watched:
        """Follow WatchRollout until the rollout ends (or reaches a state of `until`)."""
        seen = Watched()
        call = self.stub.WatchRollout(pb.WatchRolloutRequest(project=self.project, rollout_id=rollout_id))

        async def read() -> None:
            async for message in call:
                if message.HasField("snapshot"):
                    seen.snapshot = message.snapshot
                seen.events += message.events
                seen.states.append(message.state)
                seen.progress.append(message.progress)
                if message.state in until:
                    call.cancel()
                    return

        try:
            await asyncio.wait_for(read(), timeout)
        except TimeoutError:
            call.cancel()
            rollout = await self.get(rollout_id)
            raise AssertionError(
                f"rollout {rollout_id} still {pb.RolloutState.Name(rollout.state)} after {timeout}s: "
                f"{rollout.reason}\n" + "\n".join(e.message for e in seen.events[-15:])
            ) from None
        except asyncio.CancelledError:
            pass
        return seen

    async def wait_state(self, rollout_id: str, state: int, timeout: float = 30.0) -> pb.Rollout:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            rollout = await self.get(rollout_id)
            if rollout.state == state:
                return rollout
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(
                    f"rollout {rollout_id} is {pb.RolloutState.Name(rollout.state)}, want "
                    f"{pb.RolloutState.Name(pb.RolloutState.ValueType(state))}: {rollout.reason}"
                )
            await asyncio.sleep(0.1)


async def watch_past_bakes(
    rollouts: Rollouts,
    rollout_id: str,
    clock: TestClock,
    bake: timedelta,
    ready: Callable[[pb.Step], Awaitable[bool]] | None = None,
    timeout: float = 60.0,
) -> Watched:
    """Follow the rollout to its end (`Rollouts.watch`), moving the server's `clock` on
    by `bake` as each step's bake begins (the step BAKING, its gates passing), so no bake
    is waited out; with `ready`, once that also says the step is ready (a canary's
    samples are in). Heartbeats must stay fresh across the jumps: the server's
    `offline_after` far longer than they add up to."""
    jumped: set[int] = set()

    async def cut() -> None:
        while True:
            for step in (await rollouts.get(rollout_id)).steps:
                if (
                    step.index not in jumped
                    and step.state == pb.STEP_STATE_BAKING
                    and not step.HasField("gate_failing_since")
                    and (ready is None or await ready(step))
                ):
                    jumped.add(step.index)
                    clock.advance(bake)
            await asyncio.sleep(0.05)

    task = asyncio.get_running_loop().create_task(cut())
    try:
        return await rollouts.watch(rollout_id, timeout)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class _Authorized:
    """A channel whose calls carry `metadata` (an operator's API key) unless given their own."""

    def __init__(self, channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...]):
        self._channel = channel
        self._metadata = metadata

    def __getattr__(self, name: str) -> Any:
        inner = getattr(self._channel, name)
        if not self._metadata or name not in ("unary_unary", "unary_stream"):
            return inner

        def multicallable(*args: Any, **kwargs: Any) -> Any:
            method = inner(*args, **kwargs)

            def invoke(request: Any, **call_kwargs: Any) -> Any:
                call_kwargs.setdefault("metadata", self._metadata)
                return method(request, **call_kwargs)

            return invoke

        return multicallable


def canary_sampled(
    plane: Harness, rollouts: Rollouts, rollout_id: str, digest: str, need: int
) -> Callable[[pb.Step], Awaitable[bool]]:
    """For `watch_past_bakes`: a step is ready once the canary nodes so far (the
    rollout's nodes up to that step) sent `need` heartbeats on `digest` since it applied,
    the samples its analysis counts; so no analysis lacks them when the bake is over."""

    async def sampled(step: pb.Step) -> bool:
        canary = [n.node_id for n in await rollouts.nodes(rollout_id) if n.step <= step.index]
        applied = step.applied_at.ToDatetime()
        samples = 0
        for node_id in canary:
            beats = await plane.nodes.ListHeartbeats(node_pb2.ListHeartbeatsRequest(node_id=node_id))
            on_digest = [h for h in beats.heartbeats if h.applied_digest == digest]
            samples += sum(1 for h in on_digest if h.received_at.ToDatetime() > applied)
        return samples >= need

    return sampled


class _Completions:
    """Counts the completions of something that runs over and over (the rollout driver's
    passes, the drift detector's sweeps); `wait` returns once `count` whole ones began
    after this was made (the first to complete may have begun before)."""

    def __init__(self, count: int, what: str):
        self.count = count
        self.what = what
        self.done = 0
        self._enough = asyncio.Event()

    def tick(self) -> None:
        self.done += 1
        if self.done > self.count:
            self._enough.set()

    async def wait(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._enough.wait(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"{self.done} {self.what} within {timeout}s, want {self.count + 1}"
            ) from None


async def driver_passes(app: App, count: int, timeout: float = 30.0) -> None:
    """Wait until the app's rollout driver has made `count` whole passes that began after
    this call: what it would have done to a rollout by now, it has done (an event to wait
    for where a test would otherwise sleep through a few ticks)."""
    driver = app.driver
    inner = driver.on_pass
    passes = _Completions(count, "driver pass(es)")

    def counting(result: PassResult) -> None:
        inner(result)
        passes.tick()

    driver.on_pass = counting
    try:
        await passes.wait(timeout)
    finally:
        driver.on_pass = inner


async def drift_sweeps(app: App, count: int, timeout: float = 30.0) -> None:
    """Wait until the app's drift detector has made `count` whole sweeps that began after
    this call (where a test would otherwise sleep through a few sweep intervals)."""
    detector = app.drift
    sweep = detector.sweep
    sweeps = _Completions(count, "drift sweep(s)")

    async def counting() -> SweepResult:
        result = await sweep()
        sweeps.tick()
        return result

    detector.sweep = counting  # type: ignore[method-assign]
    try:
        await sweeps.wait(timeout)
    finally:
        del detector.sweep  # back to the method


def bad(error_rate: float = 0.3, p99: float = 900.0) -> MetricsProfile:
    return MetricsProfile(error_rate=error_rate, p99_latency_ms=p99, noise=0.05)
