"""What the server spends, in-process, on the two costs that dominate ADS at scale: the
recorded report behind every ACK (the registry's group-committed status path, the same
one an agent's ReportStatus takes) and opening (or reopening) an ADS stream.

    python -m bench.ads_costs [--nodes 500] [--rounds 4] [--batches 1,50,500]
                              [--database-url postgresql+asyncpg://...]

A control plane runs in this process (a fresh data directory, no rate limits); nothing
goes over a socket, so every figure is server code only (CPU time of the whole process,
every thread: the database driver's too), per item:

  report     `NodeRegistry.report_status` of an ACTIVE with an xDS record, each node
             once per round, `batch` of them in flight at once (they share one group
             commit; batch 1 is one transaction per report). Each round is a new
             AssignBundle alternating two bundles, so every report moves the node to
             another bundle (its `node.applied` audit entry included), as an ADS update
             does. The stream ledger says "sent", as it does for the stream that
             delivered the update.
  open       a DeltaAggregatedResources call through the interceptor and the servicer
             (authentication by the node's credential, the feed, the session, the first
             request: clusters by wildcard), then its end; `new` sends no resource
             versions (the server sends the clusters), `reconnect` resends what the new
             stream got (the server sends nothing), as in a reconnect storm. grpc's own
             call set-up is not included.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from envoy.service.discovery.v3 import discovery_pb2

from bench.ads import fixed_set
from bench.common import Operator
from controlplane.bootstrap import App
from controlplane.config import Settings
from controlplane.domain.model.fleet import ReportPhase, XdsRecord
from controlplane.rpc import xds as rpc_xds
from controlplane.rpc.interceptor import GuardInterceptor
from controlplane.rpc.ratelimit import RateLimit, RateLimits
from controlplane.rpc.scope import ScopeFinder

UNLIMITED = RateLimit(1e9, 1e9)
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
DELTA = f"/{rpc_xds.ADS_SERVICE}/DeltaAggregatedResources"


class _Sent:
    """The delivering stream's ledger: it sent what is reported (the ADS path)."""

    def was_sent(self, stream_id: str, node_id: str, revision: int, digest: str) -> bool | None:
        return True


class _Context:
    """Enough of a grpc.aio.ServicerContext for the interceptor and the ADS servicer."""

    def __init__(self, credential: str, i: int):
        self._metadata = (("authorization", f"Bearer {credential}"), ("x-request-id", f"r{i}"))
        self.sent: list[bytes] = []
        self._code: Any = None

    def invocation_metadata(self) -> Any:
        return self._metadata

    def peer(self) -> str:
        return "ipv4:127.0.0.1:40000"

    def auth_context(self) -> dict[str, Any]:
        return {}

    async def write(self, payload: bytes) -> None:
        self.sent.append(payload)

    def set_code(self, code: Any) -> None:
        self._code = code

    def code(self) -> Any:
        return self._code

    def set_details(self, details: str) -> None:
        raise RuntimeError(f"the call failed: {self._code}: {details}")

    def set_trailing_metadata(self, metadata: Any) -> None:
        pass

    async def abort(self, code: Any, details: str) -> None:
        raise RuntimeError(f"the call aborted: {code}: {details}")


async def _one(request: Any) -> AsyncIterator[Any]:
    yield request


def _cpu_per_item(before: float, n: int) -> float:
    return (time.process_time() - before) / n * 1e6


async def _in_flight(calls: list[Callable[[], Awaitable[Any]]], at_once: int) -> float:
    """µs of process CPU per call, `at_once` calls started together, group by group."""
    start = time.process_time()
    for i in range(0, len(calls), at_once):
        await asyncio.gather(*(c() for c in calls[i : i + at_once]))
    return _cpu_per_item(start, len(calls))


async def start_unlimited(data: Path, database_url: str = "") -> tuple[App, Operator, Any]:
    """A control plane in this process on `data`, with no rate limits (a bench's calls
    are no flood); an operator client of it; what it started on (port, enrollment token)."""
    limits = RateLimits(operator=UNLIMITED, node=UNLIMITED, anonymous=UNLIMITED, watch=UNLIMITED)
    settings = replace(
        Settings(data_dir=data, listen="127.0.0.1:0", metrics_listen="", database_url=database_url),
        rate_limits=limits,
    )
    app = App(settings)
    info = await app.start()
    return app, Operator(f"127.0.0.1:{info.port}", data), info


async def register_nodes(app: App, token: str, n: int) -> list[Any]:
    """`n` nodes x0, x1, ... (label env=b): their registrations, credentials included."""
    return [await app.nodes.register("default", token, f"x{i}", {"env": "b"}) for i in range(n)]


async def run(args: argparse.Namespace) -> None:
    data = Path(tempfile.mkdtemp(prefix="bench-ads-costs-"))
    app, operator, info = await start_unlimited(data, args.database_url)
    try:
        registered = await register_nodes(app, info.enrollment_token or "", args.nodes)
        ids = [r.node.id for r in registered]
        digests = [await operator.upload(fixed_set(k)) for k in range(2)]
        await operator.assign(digests[0], nodes=ids)
        print(
            f"{args.nodes} nodes, {'PostgreSQL' if args.database_url else 'SQLite'}; "
            "server CPU (the whole process, every thread) per item"
        )
        if "reports" in args.parts:
            await _reports(app, operator, ids, digests, args)
        if "opens" in args.parts:
            await _opens(app, registered, args)
    finally:
        await operator.close()
        await app.stop()
        shutil.rmtree(data, ignore_errors=True)


async def _reports(app: App, operator: Operator, ids: list[str], digests: list[str], args: Any) -> None:
    app.nodes.ledger = _Sent()
    change = 0
    for batch in args.batches:
        figures = []
        for _ in range(args.rounds):
            change += 1
            digest = digests[change % 2]
            revision, _, _ = await operator.assign(digest, nodes=ids)
            await app.hub.wait_until(None, revision, 10.0)
            await app.nodes.settle()
            calls = [_report(app, n, revision, digest) for n in ids]
            figures.append(await _in_flight(calls, batch))
        print(f"  report, {batch:>3} in flight: {_summary(figures)}")


def _report(app: App, node_id: str, revision: int, digest: str) -> Callable[[], Awaitable[None]]:
    xds = XdsRecord({CLUSTER: digest[7:19]}, revision, digest)
    return lambda: app.nodes.report_status(node_id, "s-bench", revision, digest, ReportPhase.ACTIVE, "", xds)


async def _opens(app: App, registered: list[Any], args: Any) -> None:
    ads = rpc_xds.AdsServicer(app.xds_feeds)
    [handler] = rpc_xds.handlers(ads, None)
    interceptor = _interceptor(app)
    details = _Details(DELTA)

    async def continuation(_: Any) -> Any:
        return handler.service(details)

    wrapped = await interceptor.intercept_service(continuation, details)
    versions: dict[str, dict[str, str]] = {}

    def open_call(i: int, reg: Any, resume: bool) -> Callable[[], Awaitable[None]]:
        async def call() -> None:
            request = discovery_pb2.DeltaDiscoveryRequest(type_url=CLUSTER)
            request.node.id = reg.node.id
            if resume:
                request.initial_resource_versions.update(versions[reg.node.id])
            context = _Context(reg.credential, i)
            await wrapped.stream_stream(_one(request), context)
            if not resume:
                got: dict[str, str] = {}
                for payload in context.sent:
                    for r in discovery_pb2.DeltaDiscoveryResponse.FromString(payload).resources:
                        got[r.name] = r.version
                versions[reg.node.id] = got
            elif context.sent:
                raise RuntimeError("a reconnect that resent its versions was sent something")

        return call

    for phase, resume in (("new", False), ("reconnect", True)):
        for at_once in args.opens_in_flight:
            figures = []
            for _ in range(args.rounds):
                calls = [open_call(i, r, resume) for i, r in enumerate(registered)]
                figures.append(await _in_flight(calls, at_once))
                await app.nodes.settle()
            print(f"  open ({phase}), {at_once:>3} in flight: {_summary(figures)}")


class _Details:
    def __init__(self, method: str):
        self.method = method
        self.invocation_metadata = ()


def _interceptor(app: App) -> GuardInterceptor:
    """The server's guard, as `App` builds it (node streams resolve no scope)."""
    return GuardInterceptor(app.authenticator, ScopeFinder({}), app.limiter)


def _summary(figures: list[float]) -> str:
    ordered = sorted(figures)
    return f"median {ordered[len(ordered) // 2]:7.0f} µs (range {ordered[0]:.0f} to {ordered[-1]:.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--batches", default="1,50,500", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--opens-in-flight", default="1,100", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--parts", default="reports,opens", help="reports, opens or both")
    parser.add_argument("--database-url", default="")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
