"""What a heartbeat and a status report cost, one at a time and many at once (group
commit shares a transaction between concurrent callers; domain/fleet/group_commit.py).

    python -m bench.group_commit [--nodes 100] [--rounds 5] [--concurrency 1,50]
                                 [--database-url postgresql+asyncpg://...]

Runs a control plane in this process (a fresh data directory) and calls it over gRPC on
loopback, so the CPU figures are the client's and the server's together: the process's
CPU time per call, and the event-loop thread's share of it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc

from bench.common import Operator, bench_bundle
from controlplane.api.identity.v1 import identity_pb2, identity_pb2_grpc
from controlplane.api.node.v1 import node_pb2, node_pb2_grpc
from controlplane.api.watch.v1 import watch_pb2, watch_pb2_grpc
from controlplane.bootstrap import App
from controlplane.config import Settings
from controlplane.rpc.ratelimit import RateLimit, RateLimits

UNLIMITED = RateLimit(1e9, 1e9)


def _bearer(secret: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {secret}"),)


def _loop_thread_cpu() -> float:
    fields = Path(f"/proc/self/task/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _measure(calls: list[Callable[[], Awaitable[Any]]], concurrency: int) -> tuple[float, float]:
    """(process CPU ms, loop-thread CPU ms) per call, `concurrency` calls in flight."""
    gate = asyncio.Semaphore(concurrency)

    async def one(call: Callable[[], Awaitable[Any]]) -> None:
        async with gate:
            await call()

    cpu, loop = time.process_time(), _loop_thread_cpu()
    await asyncio.gather(*(one(c) for c in calls))
    n = len(calls)
    return (time.process_time() - cpu) / n * 1e3, (_loop_thread_cpu() - loop) / n * 1e3


async def run(args: argparse.Namespace) -> None:
    data = Path(tempfile.mkdtemp(prefix="bench-group-commit-"))
    limits = RateLimits(operator=UNLIMITED, node=UNLIMITED, anonymous=UNLIMITED, watch=UNLIMITED)
    settings = replace(
        Settings(data_dir=data, listen="127.0.0.1:0", metrics_listen="", database_url=args.database_url),
        rate_limits=limits,
    )
    app = App(settings)
    info = await app.start()
    target = f"127.0.0.1:{info.port}"
    channel = grpc.aio.insecure_channel(target)
    nodes = node_pb2_grpc.NodeServiceStub(channel)
    identity = identity_pb2_grpc.IdentityServiceStub(channel)
    watch = watch_pb2_grpc.WatchServiceStub(channel)
    operator = Operator(target, data)
    try:
        registered: list[tuple[str, tuple[tuple[str, str]]]] = []
        for i in range(args.nodes):
            reply = await nodes.RegisterNode(
                node_pb2.RegisterNodeRequest(
                    project="default",
                    enrollment_token=info.enrollment_token or "",
                    name=f"n{i}",
                    labels={"env": "b"},
                )
            )
            token = await identity.IssueNodeToken(
                identity_pb2.IssueNodeTokenRequest(node_id=reply.node_id),
                metadata=_bearer(reply.node_credential),
            )
            registered.append((reply.node_id, _bearer(token.token)))
        metrics = node_pb2.NodeMetrics(health=node_pb2.HEALTH_STATUS_HEALTHY, p99_latency_ms=12.0)

        def beat(node_id: str, md: Any) -> Callable[[], Awaitable[Any]]:
            return lambda: nodes.Heartbeat(
                node_pb2.HeartbeatRequest(node_id=node_id, metrics=metrics), metadata=md
            )

        streams = [
            watch.WatchBundles(watch_pb2.WatchBundlesRequest(node_id=n), metadata=md) for n, md in registered
        ]
        stream_ids = [(await s.read()).events[0].started.stream_id for s in streams]
        digests = [await operator.upload(bench_bundle(f"group-commit-{k}")) for k in range(2)]
        print(
            f"{args.nodes} nodes, {'PostgreSQL' if args.database_url else 'SQLite'}; CPU per call "
            "(client and server in one process), total / event-loop thread"
        )
        for concurrency in args.concurrency:
            calls = [beat(n, md) for _ in range(args.rounds) for n, md in registered]
            total, loop = await _measure(calls, concurrency)
            print(f"  heartbeat, {concurrency:>3} in flight: {total:6.2f} / {loop:6.2f} ms")
            per_report: list[tuple[float, float]] = []
            for r in range(args.rounds):
                digest = digests[r % 2]
                await operator.assign(digest, selector="env=b")
                revisions = [await _revision_of(s, digest) for s in streams]
                for phase in (node_pb2.REPORT_PHASE_DOWNLOADED, node_pb2.REPORT_PHASE_ACTIVE):
                    reports = [
                        _report(nodes, n, md, sid, rev, digest, phase)
                        for (n, md), sid, rev in zip(registered, stream_ids, revisions, strict=True)
                    ]
                    per_report.append(await _measure(reports, concurrency))
            total = sum(t for t, _ in per_report) / len(per_report)
            loop = sum(lo for _, lo in per_report) / len(per_report)
            print(f"  report,    {concurrency:>3} in flight: {total:6.2f} / {loop:6.2f} ms")
        for s in streams:
            s.cancel()
    finally:
        await operator.close()
        await channel.close()
        await app.stop()


async def _revision_of(stream: Any, digest: str) -> int:
    while True:
        for event in (await stream.read()).events:
            if event.HasField("desired") and event.desired.digest == digest:
                return int(event.desired.revision)


def _report(
    nodes: Any, node_id: str, md: Any, stream_id: str, revision: int, digest: str, phase: Any
) -> Callable[[], Awaitable[Any]]:
    request = node_pb2.ReportStatusRequest(
        node_id=node_id, stream_id=stream_id, revision=revision, digest=digest, phase=phase
    )
    return lambda: nodes.ReportStatus(request, metadata=md)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=lambda v: [int(x) for x in v.split(",")], default=[1, 50])
    parser.add_argument("--database-url", default="")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
