"""ADS load: N Envoy-like delta streams and N WatchBundles streams on one server, same run.

    python -m bench.seed --data-dir .bench-out/xds-data --nodes 2000      # once
    python -m bench.xds  --data-dir .bench-out/xds-data --nodes 1000 --rounds 10

One `controlplane serve` process (pinned to CPU 0) and this orchestrator (CPU 1) holding
every client stream on asyncio. The first N bench nodes hold an ADS stream each
(`DeltaAggregatedResources`, authenticated with their node credential, as Envoy does:
clusters and listeners by wildcard, the endpoints and route by name, every response
acknowledged); the next N hold a WatchBundles stream (a node token, as the agent).

Each round assigns a new bundle to the N nodes of one kind (one node-list assignment:
N rows in one revision) and waits until every stream of that kind has it: an ADS client
has acknowledged a response of that revision, a watch client has received its desired
state. Rounds alternate between the kinds; the xDS bundles differ in one endpoint, so an
update is one response per stream, and each ACTIVE is recorded (`ReportStatus`'s path),
which the watch clients do not do. Server CPU per delivered update is utime+stime of the
server over the round, less the idle rate, divided by N.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf.message import Message

from bench import procstat, seed
from bench.common import (
    CLIENT_CPU,
    OUT,
    Operator,
    ServerProcess,
    bench_bundle,
    bundle_archive,
    machine,
    pin_self,
    write_json,
)
from controlplane.api.node.v1 import node_pb2, node_pb2_grpc
from controlplane.api.watch.v1 import watch_pb2, watch_pb2_grpc
from controlplane.xds import types
from tests.support.xds import bundle_files, cluster, endpoints, listener, route

CHANNELS = 8


def xds_bundle(upstream_port: int) -> bytes:
    site = (
        listener("http", "main", 18080),
        route("main", "app"),
        cluster("app"),
        endpoints("app", upstream_port),
    )
    return bundle_archive(bundle_files(site))


class AdsClient:
    """One Envoy-like delta stream: subscribes, acknowledges everything."""

    def __init__(self, node: dict[str, str]):
        self.node = node
        self.revision = 0
        self.responses = 0
        self.changed = asyncio.Event()

    async def run(self, channel: grpc.aio.Channel) -> None:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        call = stub.DeltaAggregatedResources(
            metadata=(("authorization", f"Bearer {self.node['credential']}"),)
        )
        subscriptions: list[Message] = [
            discovery_pb2.DeltaDiscoveryRequest(
                type_url=types.CLUSTER.url, node={"id": self.node["node_id"]}
            ),
            discovery_pb2.DeltaDiscoveryRequest(
                type_url=types.ENDPOINT.url, resource_names_subscribe=["app"]
            ),
            discovery_pb2.DeltaDiscoveryRequest(type_url=types.LISTENER.url),
            discovery_pb2.DeltaDiscoveryRequest(type_url=types.ROUTE.url, resource_names_subscribe=["main"]),
        ]
        for request in subscriptions:
            await call.write(request)
        async for response in call:
            await call.write(
                discovery_pb2.DeltaDiscoveryRequest(type_url=response.type_url, response_nonce=response.nonce)
            )
            self.responses += 1
            self.revision = max(self.revision, int(response.nonce.split("-", 1)[0]))
            self.changed.set()


class WatchClient:
    """One WatchBundles stream; with `report`, each desired state is acknowledged as an
    agent does once it runs it (ReportStatus ACTIVE), so both kinds record a report."""

    def __init__(self, node: dict[str, str], report: bool = False):
        self.node = node
        self.report = report
        self.revision = 0
        self.changed = asyncio.Event()

    async def run(self, channel: grpc.aio.Channel) -> None:
        stub = watch_pb2_grpc.WatchServiceStub(channel)
        nodes = node_pb2_grpc.NodeServiceStub(channel)
        bearer = (("authorization", f"Bearer {self.node['token']}"),)
        call = stub.WatchBundles(watch_pb2.WatchBundlesRequest(node_id=self.node["node_id"]), metadata=bearer)
        stream_id = ""
        async for response in call:
            for event in response.events:
                kind = event.WhichOneof("event")
                if kind == "started":
                    stream_id = event.started.stream_id
                if kind != "desired" or not event.desired.digest:
                    continue
                if self.report:
                    await nodes.ReportStatus(
                        node_pb2.ReportStatusRequest(
                            node_id=self.node["node_id"],
                            stream_id=stream_id,
                            revision=event.desired.revision,
                            digest=event.desired.digest,
                            phase=node_pb2.REPORT_PHASE_ACTIVE,
                        ),
                        metadata=bearer,
                    )
                self.revision = max(self.revision, event.desired.revision)
                self.changed.set()


async def all_at(clients: Sequence[AdsClient | WatchClient], revision: int, within: float) -> None:
    deadline = time.monotonic() + within
    for c in clients:
        while c.revision < revision:
            c.changed.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{c.node['name']} at {c.revision}, want {revision}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(c.changed.wait(), remaining)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    nodes = await seed.ensure(args.data_dir, 2 * args.nodes)
    ads_nodes, watch_nodes = nodes[: args.nodes], nodes[args.nodes :]
    server = ServerProcess(args.data_dir, extra_args=args.server_arg)
    server.start()
    operator = Operator(server.target, args.data_dir)
    channels = [grpc.aio.insecure_channel(server.target) for _ in range(CHANNELS)]
    tasks: list[asyncio.Task[None]] = []
    try:
        # A first bundle of each kind, before the streams open.
        xds = [await operator.upload(xds_bundle(20000 + i)) for i in range(args.rounds + 1)]
        plain = [
            await operator.upload(bench_bundle(f"xds-bench-{time.time()}-{i}"))
            for i in range(args.rounds + 1)
        ]
        ads_ids = [n["node_id"] for n in ads_nodes]
        watch_ids = [n["node_id"] for n in watch_nodes]
        await operator.assign(xds[0], nodes=ads_ids)
        await operator.assign(plain[0], nodes=watch_ids)
        ads: list[AdsClient | WatchClient] = [AdsClient(n) for n in ads_nodes]
        watch: list[AdsClient | WatchClient] = [WatchClient(n, args.watch_report) for n in watch_nodes]
        t0 = time.monotonic()
        cpu0 = procstat.cpu_seconds(server.pid)
        tasks = [asyncio.create_task(c.run(channels[i % CHANNELS])) for i, c in enumerate(ads + watch)]
        await all_at(ads + watch, 1, 120)
        opened = {"s": time.monotonic() - t0, "server_cpu_s": procstat.cpu_seconds(server.pid) - cpu0}
        print(f"opened {len(tasks)} streams in {opened['s']:.1f} s", flush=True)
        await asyncio.sleep(3)  # ACTIVE reports settle
        c0, w0 = procstat.cpu_seconds(server.pid), time.monotonic()
        await asyncio.sleep(args.idle)
        idle_rate = (procstat.cpu_seconds(server.pid) - c0) / (time.monotonic() - w0)
        sent0 = server.metrics().get("controlplane_xds_resources_sent_total", 0.0)
        rounds: dict[str, list[dict[str, float]]] = {"ads": [], "watch": []}
        for r in range(1, args.rounds + 1):
            for kind, clients, bundles, ids in (
                ("ads", ads, xds, ads_ids),
                ("watch", watch, plain, watch_ids),
            ):
                await asyncio.sleep(1.0)  # the previous round's reports land
                c0, w0 = procstat.cpu_seconds(server.pid), time.monotonic()
                revision, _, _ = await operator.assign(bundles[r], nodes=ids)
                await all_at(clients, revision, 120)
                wall = time.monotonic() - w0
                if kind == "ads" or args.watch_report:
                    await asyncio.sleep(0.5)  # include the ACTIVE reports' writes
                    wall = time.monotonic() - w0
                cpu = procstat.cpu_seconds(server.pid) - c0
                per = max(0.0, cpu - idle_rate * wall) / len(clients) * 1e6
                rounds[kind].append({"wall_s": wall, "cpu_s": cpu, "us_per_update": per})
                print(
                    f"round {r} {kind}: {wall * 1000:.0f} ms, {per:.0f} µs server CPU per update", flush=True
                )
        sent = server.metrics().get("controlplane_xds_resources_sent_total", 0.0) - sent0
        summary = {
            kind: {
                "median_us_per_update": statistics.median(x["us_per_update"] for x in rs),
                "median_round_ms": statistics.median(x["wall_s"] for x in rs) * 1000,
            }
            for kind, rs in rounds.items()
        }
        return {
            "nodes_per_kind": args.nodes,
            "watch_report": args.watch_report,
            "rounds": rounds,
            "summary": summary,
            "opened": opened,
            "idle_cpu_rate": idle_rate,
            "ads_resources_sent_in_rounds": sent,
            "load_before": args.load_before,
            "machine": machine(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in channels:
            await channel.close()
        await operator.close()
        server.stop()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=OUT / "xds-data")
    p.add_argument("--nodes", type=int, default=1000, help="streams of each kind")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--idle", type=float, default=5.0, help="seconds to measure the idle CPU rate")
    p.add_argument("--server-arg", action="append", default=[])
    p.add_argument(
        "--watch-report",
        action="store_true",
        help="WatchBundles clients report ACTIVE (ReportStatus) for each desired state, as agents do",
    )
    args = p.parse_args(argv)
    args.load_before = os.getloadavg()
    pin_self(CLIENT_CPU)
    result = asyncio.run(run(args))
    result["load_after"] = os.getloadavg()
    print(json.dumps(result["summary"], indent=2))
    print(f"load average before {args.load_before}, after {result['load_after']}")
    print(f"wrote {write_json('xds.json', result)}")


if __name__ == "__main__":
    main()
