"""What an idle ADS stream costs the server in memory, in-process, over real gRPC.

    python -m bench.ads_idle [--nodes 500] [--kinds delta,sotw] [--no-trace]

A control plane runs in this process (a fresh SQLite data directory); a client in a
subprocess (this module with `--client`) opens real ADS streams to it over loopback, 16
HTTP/2 connections, each stream as `bench.ads`'s Go generator does it: clusters and
listeners by wildcard, the 10 route configurations of `bench.ads.fixed_set` by name,
every response acknowledged at once. Each kind runs in a process of its own:

1. one warm-up stream (node N+1) until its node is ACTIVE, so one-off costs (the bundle
   parsed, encodings cached, modules warmed) are not counted per stream;
2. the baseline: `gc.collect()`, a tracemalloc snapshot, the process's VmRSS;
3. N streams, until every node is ACTIVE and the registry has settled, then 2 s more;
4. the same figures again: (after - baseline) / N, and tracemalloc's largest
   differences by source line.

tracemalloc sees Python's allocations only (grpc's C core allocates outside it); VmRSS
sees both, but with tracemalloc running it includes tracemalloc's own bookkeeping, so
the RSS figure to quote is the one of a `--no-trace` run.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CONNECTIONS = 16


def _rss_kib() -> int:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


# -- the client (a subprocess) ----------------------------------------------------------


async def _client(target: str, kind: str) -> None:
    import grpc
    from envoy.service.discovery.v3 import discovery_pb2

    from bench.ads import ROUTES

    nodes = json.loads(sys.stdin.readline())
    delta = kind == "delta"
    method = "/envoy.service.discovery.v3.AggregatedDiscoveryService/" + (
        "DeltaAggregatedResources" if delta else "StreamAggregatedResources"
    )
    req_cls = discovery_pb2.DeltaDiscoveryRequest if delta else discovery_pb2.DiscoveryRequest
    resp_cls = discovery_pb2.DeltaDiscoveryResponse if delta else discovery_pb2.DiscoveryResponse
    channels = [
        grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1), ("x.conn", i)])
        for i in range(CONNECTIONS)
    ]
    ready = 0
    all_ready = asyncio.Event()

    async def stream(i: int, node_id: str, credential: str) -> None:
        nonlocal ready
        call = channels[i % CONNECTIONS].stream_stream(
            method, request_serializer=req_cls.SerializeToString, response_deserializer=resp_cls.FromString
        )(metadata=(("authorization", f"Bearer {credential}"),))
        names = {CLUSTER: [], LISTENER: [], ROUTE: list(ROUTES)}
        for url, wanted in names.items():
            req = req_cls(type_url=url)
            req.node.id = node_id
            if delta:
                req.resource_names_subscribe.extend(wanted)
            else:
                req.resource_names.extend(wanted)
            await call.write(req)
        seen: set[str] = set()
        counted = False
        async for resp in call:
            ack = req_cls(type_url=resp.type_url, response_nonce=resp.nonce)
            if not delta:
                ack.version_info = resp.version_info
                ack.resource_names.extend(names.get(resp.type_url, []))
            await call.write(ack)
            seen.add(resp.type_url)
            if not counted and len(seen) == 3:
                counted = True
                ready += 1
                if ready == len(nodes):
                    all_ready.set()

    tasks = [asyncio.create_task(stream(i, n, c)) for i, (n, c) in enumerate(nodes)]
    await all_ready.wait()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for ch in channels:
        await ch.close()


# -- the server side ------------------------------------------------------------------------


class _Clients:
    """A client subprocess holding streams open until told to stop."""

    def __init__(self, proc: asyncio.subprocess.Process):
        self.proc = proc

    @classmethod
    async def start(cls, port: int, kind: str, nodes: list[tuple[str, str]]) -> _Clients:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.ads_idle", "--client", f"127.0.0.1:{port}", "--kinds", kind,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdin is not None
        proc.stdin.write((json.dumps(nodes) + "\n").encode())
        await proc.stdin.drain()
        return cls(proc)

    async def ready(self, within: float) -> None:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), within)
        if line.strip() != b"ready":
            raise RuntimeError(f"the client did not get ready: {line!r}")

    async def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"stop\n")
        await self.proc.stdin.drain()
        try:
            await asyncio.wait_for(self.proc.wait(), 30)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


async def _active(app: Any, ids: list[str], within: float) -> None:
    """Until every node's open session is ACTIVE at its target."""
    from controlplane.xds.status import Phase

    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        sessions = app.xds_feeds.sessions
        done = sum(
            1
            for n in ids
            if (s := sessions.get(n)) is not None and s.status is not None and s.status.phase is Phase.ACTIVE
        )
        if done == len(ids):
            return
        await asyncio.sleep(0.25)
    raise RuntimeError(f"not every node became ACTIVE within {within:g} s")


async def _kind(kind: str, args: argparse.Namespace) -> None:
    from bench.ads import fixed_set
    from bench.ads_costs import register_nodes, start_unlimited

    data = Path(tempfile.mkdtemp(prefix="bench-ads-idle-"))
    app, operator, info = await start_unlimited(data)
    try:
        registered = await register_nodes(app, info.enrollment_token or "", args.nodes + 1)
        pairs = [(r.node.id, r.credential) for r in registered]
        digest = await operator.upload(fixed_set(0))
        await operator.assign(digest, nodes=[p[0] for p in pairs])
        warm = await _Clients.start(info.port, kind, pairs[-1:])
        await warm.ready(60)
        await _active(app, [pairs[-1][0]], 60)
        await app.nodes.settle()
        await asyncio.sleep(2)
        gc.collect()
        before = tracemalloc.take_snapshot() if tracemalloc.is_tracing() else None
        rss_before = _rss_kib()
        t0 = time.monotonic()
        clients = await _Clients.start(info.port, kind, pairs[:-1])
        await clients.ready(args.timeout)
        await _active(app, [p[0] for p in pairs[:-1]], args.timeout)
        opened = time.monotonic() - t0
        await app.nodes.settle()
        await asyncio.sleep(2)
        gc.collect()
        after = tracemalloc.take_snapshot() if tracemalloc.is_tracing() else None
        rss_after = _rss_kib()
        n = args.nodes
        rss = (rss_after - rss_before) / n
        line = f"{kind}: {n} streams open and ACTIVE in {opened:.1f} s; VmRSS {rss:.1f} KiB/stream"
        if before is not None and after is not None:
            stats = after.compare_to(before, "lineno" if args.frames == 1 else "traceback")
            total = sum(s.size_diff for s in stats)
            line += f"; tracemalloc {total / n / 1024:.2f} KiB/stream"
            print(line)
            for s in sorted(stats, key=lambda s: -s.size_diff)[: args.top]:
                if s.size_diff <= 0:
                    break
                where = " < ".join(
                    f"{os.path.basename(f.filename)}:{f.lineno}" for f in reversed(list(s.traceback))
                )
                print(f"  {s.size_diff / n:8.0f} B/stream {s.count_diff / n:6.2f} blocks  {where}")
        else:
            print(line)
        await clients.stop()
        await warm.stop()
    finally:
        await operator.close()
        await app.stop()
        shutil.rmtree(data, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=500)
    parser.add_argument("--kinds", default="delta,sotw")
    parser.add_argument("--no-trace", action="store_true", help="VmRSS only (tracemalloc off)")
    parser.add_argument("--top", type=int, default=25, help="source lines listed")
    parser.add_argument(
        "--frames", type=int, default=1, help="frames kept per allocation; > 1 groups by traceback"
    )
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--client", metavar="TARGET", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        asyncio.run(_client(args.client, args.kinds))
        return
    kinds = args.kinds.split(",")
    if len(kinds) > 1:
        # A process per kind: memory the first one freed would be reused by the next.
        for kind in kinds:
            argv = [*sys.argv[1:], "--kinds", kind]
            subprocess.run([sys.executable, "-m", "bench.ads_idle", *argv], check=True)
        return
    if not args.no_trace:
        tracemalloc.start(args.frames)
    asyncio.run(_kind(kinds[0], args))


if __name__ == "__main__":
    main()
