"""ADS at scale: N Envoy-like streams (delta, then state of the world) and N WatchBundles
streams, driven by the Go load generator against the same server code and data in one run.

    make bench-ads                                     # N = 1,000, every kind
    make bench-ads BENCH_NODES=10000
    python -m bench.ads --nodes 10000 --kinds delta,watch --changes 10 --storms 2

The first N bench nodes (`bench.seed`, in `--data-dir`) each hold one stream of the kind
under test; kinds run one after the other, each on a fresh `controlplane serve` (pinned
to CPU 0; the load generator and this orchestrator on CPU 1), so each kind's memory and
idle figures start from the same empty server:

  watch         WatchBundles with the node's token (bench/goloadgen, --proto cp);
  watch-report  the same, and each desired state reported ACTIVE (ReportStatus), as an
                agent does once it runs it: the counterpart of an ADS ACK, which the
                server records as ACTIVE (--proto cp --report);
  delta         DeltaAggregatedResources with the node's credential, as Envoy: clusters
                and listeners by wildcard, the route configurations by name, every
                response acknowledged at once (--proto ads-delta);
  sotw          StreamAggregatedResources, the same subscriptions (--proto ads-sotw).

Every node holds the same fixed set: 1 listener, 10 route configurations, 10 clusters
(static, endpoints inline). Each change is an AssignBundle (one node-list revision for
the N nodes) of a bundle that differs from the previous one in one route configuration.

Phases per kind:

  establish  N streams opened at one instant: time until all have their first state,
             server CPU per stream;
  idle       after settling, server RSS per idle stream = (VmRSS with N streams - VmRSS
             with one warm-up stream of the kind, on node N+1) / N, and the idle CPU rate;
  fleet      a warm-up change, then `--changes` changes one at a time, each waited for at
             every stream: per-stream latency from the AssignBundle call (p50/p99/max over
             every delivery), time until all have it, server CPU per delivered update =
             (server CPU - idle rate x wall) / deliveries, the wall running until the
             server is idle again (so an ADS update includes its ACK and the recorded
             ACTIVE); the load generator's CPU over the same wall;
  storm      every stream cancelled at one instant and reopened saying what it holds
             (WatchBundles: cursor and epoch; delta: initial_resource_versions; SotW: each
             type's version_info): time until caught up (WatchBundles: the resume
             Bookmark; ADS: every stream open again on the server and the server idle,
             since a resume owes the client no response), what the server sent (ADS:
             `controlplane_xds_resources_sent_total`; WatchBundles: bootstraps), and
             server CPU per reconnect.

Results: a table on stdout and every figure in .bench-out/ads-n<N>-<run>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from bench import etcdapi, gobuild, procstat, seed
from bench.common import (
    CLIENT_CPU,
    OUT,
    Operator,
    ServerProcess,
    bundle_archive,
    machine,
    metric_sum,
    pin_self,
    quantiles,
    result_name,
    rotated,
    write_json,
)
from bench.compare import parse_sources
from bench.workers import Workers, merge_open
from tests.support.xds import bundle_files, cluster, listener, route

KINDS = {"watch": "cp", "watch-report": "cp", "delta": "ads-delta", "sotw": "ads-sotw"}
WATCH_KINDS = ("watch", "watch-report")
ROUTES = [f"r{i}" for i in range(10)]
STREAMS_OPEN = "controlplane_xds_streams_open"
SENT = "controlplane_xds_resources_sent_total"
BOOTSTRAPS = "controlplane_watch_bootstraps_total"


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def fixed_set(change: int) -> bytes:
    """1 listener, 10 route configurations, 10 clusters; `change` moves one route."""
    site = [listener("http", ROUTES[0], 18080)]
    for i, name in enumerate(ROUTES):
        prefix = f"/v{change}/" if i == 0 else f"/{name}/"
        site.append(route(name, f"c{i}", prefix=prefix))
    site += [cluster(f"c{i}", eds=False, port=20000 + i) for i in range(10)]
    return bundle_archive(bundle_files(site))


async def quiet(pid: int, idle_rate: float, within: float, window: float = 0.25) -> float:
    """Wait until the server's CPU rate over `window` is back near its idle rate (at
    most `within` s); the time it took."""
    t0 = time.monotonic()
    c = procstat.cpu_seconds(pid)
    while time.monotonic() - t0 < within:
        await asyncio.sleep(window)
        c1 = procstat.cpu_seconds(pid)
        if (c1 - c) / window <= max(2 * idle_rate, 0.05):
            break
        c = c1
    return time.monotonic() - t0


async def until_open(server: ServerProcess, n: int, within: float) -> None:
    """Poll the server's gauge of open ADS streams until it reads `n` (or `within` s)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if metric_sum(server.metrics(), STREAMS_OPEN) >= n:
            return
        await asyncio.sleep(0.25)


class KindRun:
    def __init__(self, a: argparse.Namespace, kind: str, nodes: list[dict[str, str]], bundles: list[str]):
        self.a = a
        self.kind = kind
        # The last node holds one stream of the kind before the baseline is read, so the
        # one-off costs (the bundle parsed, modules and caches warmed) are not per stream.
        self.nodes, self.warm = nodes[:-1], nodes[-1]
        self.bundles = bundles
        self.ids = [n["node_id"] for n in self.nodes]
        self.out: dict[str, Any] = {"kind": kind, "nodes": len(nodes)}
        self.server = ServerProcess(a.data_dir, extra_args=a.server_arg)
        self.workers = Workers()
        self.warm_workers = Workers()
        self.idle_rate = 0.0

    def cpu(self) -> float:
        return procstat.cpu_seconds(self.server.pid)

    async def go(self, program: list[str], run_dir: Path) -> dict[str, Any]:
        a = self.a
        self.server.start()
        operator = Operator(self.server.target, a.data_dir)
        try:
            await operator.assign(self.bundles[0], nodes=self.ids)  # node lists hold ≤ 10,000
            await operator.assign(self.bundles[0], nodes=[self.warm["node_id"]])
            extra = ["--proto", KINDS[self.kind], "--ads-routes", ",".join(ROUTES)]
            if self.kind == "watch-report":
                extra.append("--report")
            if a.source_addrs:
                extra += ["--source-addrs", ",".join(parse_sources(a.source_addrs))]
            for workers, nodes, connections, sub in (
                (self.warm_workers, [self.warm], 1, "warm"),
                (self.workers, self.nodes, a.connections, "streams"),
            ):
                await workers.start(
                    self.server.target,
                    [self.secret(n) for n in nodes],
                    1,
                    connections,
                    run_dir / self.kind / sub,
                    cpus=CLIENT_CPU,
                    program=program,
                    extra_args=lambda i: extra,
                )
            opened = await self.warm_workers.all("open", since="zero", timeout=a.timeout)
            warm = merge_open(opened, time.time())
            if warm["ready"] != 1:
                raise RuntimeError(f"the warm-up stream did not open: {warm['details']}")
            await asyncio.sleep(3.0)
            rss0 = procstat.rss_bytes(self.server.pid)
            async with self.profiled("establish", run_dir):
                await self.establish()
            await self.idle(rss0)
            async with self.profiled("fleet", run_dir):
                await self.fleet(operator)
            async with self.profiled("storm", run_dir):
                await self.storm()
        finally:
            await self.workers.stop()
            await self.warm_workers.stop()
            await operator.close()
            self.server.stop()
        return self.out

    @contextlib.asynccontextmanager
    async def profiled(self, phase: str, run_dir: Path) -> AsyncIterator[None]:
        """Sample the server with py-spy (collapsed stacks) while `phase` runs, if asked;
        `python -m bench.profsum FILE` summarises it."""
        if not self.a.py_spy or phase not in self.a.profile.split(","):
            yield
            return
        out = run_dir / f"profile-{self.kind}-{phase}.txt"
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = [self.a.py_spy, "record", "--pid", str(self.server.pid), "--rate", "200", "--nonblocking"]
        cmd += ["--format", "raw", "--threads", "--output", str(out)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: ASYNC220
        await asyncio.sleep(0.5)
        try:
            yield
        finally:
            proc.send_signal(2)  # py-spy writes its file on SIGINT
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            say(f"  profile of {self.kind} {phase}: {out}")

    def secret(self, n: dict[str, str]) -> dict[str, str]:
        """What the stream authenticates with: a node token (agent), the credential (Envoy)."""
        if self.kind in WATCH_KINDS:
            return {"node_id": n["node_id"], "token": n["token"]}
        return {"node_id": n["node_id"], "credential": n["credential"]}

    async def establish(self) -> None:
        c0, at = self.cpu(), time.time() + 0.2
        reports = await self.workers.all("open", at=at, since="zero", retry="agent", timeout=self.a.timeout)
        opened = merge_open(reports, at)
        cpu = self.cpu() - c0
        self.out["establish"] = {
            "ready": opened["ready"],
            "all_ready_s": opened["all_ready_s"],
            "server_us_per_stream": cpu / len(self.nodes) * 1e6,
            "errors": opened["errors"],
            "details": opened["details"],
        }
        say(f"  {self.kind}: {opened['ready']}/{len(self.nodes)} streams ready in {opened['all_ready_s']} s")
        if opened["ready"] < len(self.nodes):
            raise RuntimeError(
                f"only {opened['ready']} of {len(self.nodes)} streams opened: {opened['details']}"
            )

    async def idle(self, rss0: int) -> None:
        await asyncio.sleep(self.a.settle)
        c0, w0 = self.cpu(), time.monotonic()
        await asyncio.sleep(self.a.idle_window)
        self.idle_rate = (self.cpu() - c0) / (time.monotonic() - w0)
        rss = procstat.rss_bytes(self.server.pid)
        self.out["idle"] = {
            "rss_before_mib": rss0 / 2**20,
            "rss_with_streams_mib": rss / 2**20,
            "rss_kib_per_stream": (rss - rss0) / len(self.nodes) / 1024,
            "server_cpu_pct": self.idle_rate * 100,
        }
        say(f"  {self.kind}: {self.out['idle']['rss_kib_per_stream']:.1f} KiB RSS per idle stream")

    async def fleet(self, operator: Operator) -> None:
        a, n = self.a, len(self.nodes)
        rev, _, _ = await operator.assign(self.bundles[1], nodes=self.ids)
        await self.workers.all("wait", rev=rev, need=-1, timeout=a.timeout)
        await quiet(self.server.pid, self.idle_rate, 30)
        s0, stats0 = self.server.metrics(), await self.workers.all("stats")
        c0, l0, w0 = self.cpu(), self.workers.cpu(), time.monotonic()
        changes: list[tuple[int, float, float]] = []
        for i in range(a.changes):
            await asyncio.sleep(a.gap)
            rev, t0, t1 = await operator.assign(self.bundles[2 + i], nodes=self.ids)
            await self.workers.all("wait", rev=rev, need=-1, timeout=a.timeout)
            changes.append((rev, t0, t1))
        settle = await quiet(self.server.pid, self.idle_rate, 30)
        wall = time.monotonic() - w0
        cpu, lcpu = self.cpu() - c0, self.workers.cpu() - l0
        s1, stats1 = self.server.metrics(), await self.workers.all("stats")
        receipts = await self.workers.receipts([r for r, _, _ in changes])
        delivered = sum(len(receipts.get(r, [])) for r, _, _ in changes)
        latencies = [t - t0 for r, t0, _ in changes for t in receipts.get(r, [])]
        all_have = [max(receipts[r]) - t0 for r, t0, _ in changes if receipts.get(r)]
        q = quantiles(latencies)
        net = max(0.0, cpu - self.idle_rate * wall)
        self.out["fleet"] = {
            "changes": len(changes),
            "delivered": delivered,
            "short": [r for r, _, _ in changes if len(receipts.get(r, [])) < n],
            "stream_p50_ms": q["p50"] * 1000,
            "stream_p99_ms": q["p99"] * 1000,
            "stream_max_ms": q["max"] * 1000,
            "all_have_median_ms": statistics.median(all_have) * 1000 if all_have else None,
            "all_have_max_ms": max(all_have) * 1000 if all_have else None,
            "server_us_per_update": net / max(delivered, 1) * 1e6,
            "server_cpu_s": cpu,
            "wall_s": wall,
            "settle_s": settle,
            "loadgen_us_per_update": lcpu / max(delivered, 1) * 1e6,
            "loadgen_cpu_pct": lcpu / wall * 100,
            "xds_resources_sent": metric_sum(s1, SENT) - metric_sum(s0, SENT),
            "reports": sum(x.get("reports", 0) for x in stats1) - sum(x.get("reports", 0) for x in stats0),
            "errors": [x["errors"] for x in stats1],
        }
        f = self.out["fleet"]
        say(
            f"  {self.kind}: {delivered} updates, p99 {f['stream_p99_ms']:.0f} ms, "
            f"{f['server_us_per_update']:.0f} µs server CPU per update, "
            f"loadgen {f['loadgen_us_per_update']:.0f} µs per update"
        )

    async def storm(self) -> None:
        a, n = self.a, len(self.nodes)
        storms = []
        for k in range(a.storms):
            await asyncio.sleep(1.0)
            m0 = self.server.metrics()
            stats0 = await self.workers.all("stats")
            c0, l0, at = self.cpu(), self.workers.cpu(), time.time() + 0.2
            reports = await self.workers.all("storm", at=at, kind="streams", timeout=a.timeout)
            opened = merge_open(reports, at)
            if self.kind in WATCH_KINDS:
                caught_up = opened["all_ready_s"]
            else:
                # The streams are open again on the server (its gauge back at N) and
                # it has handled their requests (its CPU back near idle).
                await until_open(self.server, n + 1, a.timeout)  # and the warm-up stream
                await quiet(self.server.pid, self.idle_rate, a.timeout, window=0.1)
                caught_up = time.time() - at
            wall = time.time() - at
            cpu, lcpu = self.cpu() - c0, self.workers.cpu() - l0
            await asyncio.sleep(1.0)  # anything sent late still counts
            m1 = self.server.metrics()
            stats1 = await self.workers.all("stats")
            storms.append(
                {
                    "caught_up_s": caught_up,
                    "reopened": opened["ready"],
                    "streams_open_after": metric_sum(m1, STREAMS_OPEN),
                    "server_us_per_reconnect": max(0.0, cpu - self.idle_rate * wall) / n * 1e6,
                    "loadgen_cpu_s": lcpu,
                    "responses_received": sum(s["messages"] for s in stats1)
                    - sum(s["messages"] for s in stats0),
                    "resources_received": sum(s["events"] for s in stats1) - sum(s["events"] for s in stats0),
                    "xds_resources_sent": metric_sum(m1, SENT) - metric_sum(m0, SENT),
                    "bootstraps": metric_sum(m1, BOOTSTRAPS) - metric_sum(m0, BOOTSTRAPS),
                    "errors": opened["errors"],
                }
            )
            s = storms[-1]
            say(
                f"  {self.kind} storm {k + 1}: caught up in {caught_up:.2f} s, "
                f"{s['responses_received']} responses / {s['resources_received']} resources received, "
                f"{s['xds_resources_sent']:.0f} xDS resources sent, {s['bootstraps']:.0f} bootstraps"
            )
        self.out["storms"] = storms
        self.out["storm"] = {
            key: statistics.median(float(s[key]) for s in storms)
            for key in ("caught_up_s", "server_us_per_reconnect", "responses_received", "xds_resources_sent")
        }


# -- the table ---------------------------------------------------------------------------

FIGURES: list[tuple[str, str, str, str]] = [
    ("fleet", "server_us_per_update", "server CPU per delivered update", "µs"),
    ("fleet", "stream_p50_ms", "one change to every stream: per-stream latency p50", "ms"),
    ("fleet", "stream_p99_ms", "  p99", "ms"),
    ("fleet", "stream_max_ms", "  max", "ms"),
    ("fleet", "all_have_median_ms", "  time until all have it, median of changes", "ms"),
    ("fleet", "loadgen_us_per_update", "load generator CPU per update", "µs"),
    ("fleet", "loadgen_cpu_pct", "  load generator CPU during the changes (of one core)", "%"),
    ("idle", "rss_kib_per_stream", "server RSS per idle stream", "KiB"),
    ("idle", "server_cpu_pct", "  server CPU with N idle streams", "%"),
    ("establish", "all_ready_s", "N streams opened at once: all have their state", "s"),
    ("establish", "server_us_per_stream", "  server CPU per new stream", "µs"),
    ("storm", "caught_up_s", "reconnect storm: caught up", "s"),
    ("storm", "responses_received", "  responses received in the storm", ""),
    ("storm", "xds_resources_sent", "  xDS resources sent in the storm", ""),
    ("storm", "server_us_per_reconnect", "  server CPU per reconnect", "µs"),
]


def fmt(v: Any, unit: str) -> str:
    if v is None:
        return "-"
    text = f"{v:,.0f}" if abs(v) >= 100 or not unit else f"{v:.3g}" if unit == "s" else f"{v:.1f}"
    return f"{text} {unit}".strip()


def medians(runs: list[dict[str, Any]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for section, key, _, _ in FIGURES:
        vals = [r[section][key] for r in runs if r.get(section, {}).get(key) is not None]
        out[f"{section}.{key}"] = statistics.median(vals) if vals else None
    return out


def table(res: dict[str, Any]) -> str:
    kinds = [k for k in KINDS if res["runs"].get(k)]
    meds = {k: medians(res["runs"][k]) for k in kinds}
    ads = [k for k in kinds if k not in WATCH_KINDS]
    pairs = [(k, w) for w in WATCH_KINDS if w in kinds for k in ads]
    head = ["figure", *kinds] + [f"{k} / {w}" for k, w in pairs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for section, key, label, unit in FIGURES:
        k = f"{section}.{key}"
        row = [label, *(fmt(meds[kind][k], unit) for kind in kinds)]
        for kind, w in pairs:
            v, base = meds[kind][k], meds[w][k]
            ratio = (section, key) == ("fleet", "server_us_per_update")
            row.append(f"{v / base:.2f}x" if ratio and v is not None and base else "")
        lines.append("| " + " | ".join(row) + " |")
    p = res["params"]
    lines += [
        "",
        f"N = {p['nodes']:,} streams of each kind, one at a time on a fresh server; medians of "
        f"{p['rounds']} round(s); {p['changes']} changes, {p['storms']} storm(s) per kind; "
        f"{p['connections']} HTTP/2 connections; load average {res['load_before']} before, "
        f"{res.get('load_after')} after.",
    ]
    failed = {k: [r["error"] for r in res["runs"].get(k, []) if "error" in r] for k in KINDS}
    lines += [f"FAILED runs of {k}: {errs}" for k, errs in failed.items() if errs]
    return "\n".join(lines)


# -- main ---------------------------------------------------------------------------------


async def main_async(a: argparse.Namespace) -> dict[str, Any]:
    kinds = [k.strip() for k in a.kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise SystemExit(f"--kinds: unknown {bad or kinds}; choose from {', '.join(KINDS)}")
    program = [str(gobuild.build(etcdapi.load()))]
    nodes = await seed.ensure(a.data_dir, a.nodes + 1)  # and one warm-up node
    run_id = time.strftime("%Y%m%d-%H%M%S")
    res: dict[str, Any] = {
        "run_id": run_id,
        "machine": machine(),
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "load_before": os.getloadavg(),
        "runs": {k: [] for k in kinds},
    }
    # The bundles: uploaded once (they stay in the data directory's store).
    server = ServerProcess(a.data_dir, cpus=None)
    server.start()
    operator = Operator(server.target, a.data_dir)
    try:
        bundles = [await operator.upload(fixed_set(i)) for i in range(a.changes + 2)]
    finally:
        await operator.close()
        server.stop()
    run_dir = OUT / f"ads-{run_id}"
    for rnd, kind in rotated(kinds, a.rounds):
        say(f"round {rnd + 1}/{a.rounds}: {kind}, {a.nodes} streams")
        run = KindRun(a, kind, nodes, bundles)
        try:
            out = await run.go(program, run_dir / f"r{rnd}")
        except Exception as e:  # keep the other kinds' figures; the table names the gap
            say(f"  {kind} failed: {e!r}")
            out = {**run.out, "error": repr(e)}
        out["load_after"] = os.getloadavg()
        res["runs"][kind].append(out)
        write_json(result_name("ads", a, run_id), res)
    res["load_after"] = os.getloadavg()
    return res


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=1000, help="streams of each kind (N)")
    p.add_argument("--kinds", default=",".join(KINDS), help=", ".join(KINDS))
    p.add_argument("--rounds", type=int, default=1, help="rounds over the kinds; medians are reported")
    p.add_argument("--changes", type=int, default=10, help="fleet-wide changes per kind")
    p.add_argument("--gap", type=float, default=0.3, help="pause between changes, s")
    p.add_argument("--storms", type=int, default=2)
    p.add_argument("--settle", type=float, default=8.0, help="s after opening before the idle figures")
    p.add_argument("--idle-window", type=float, default=5.0, help="s of idle CPU measurement")
    p.add_argument("--connections", type=int, default=16, help="HTTP/2 connections in all")
    p.add_argument("--source-addrs", default="", help="loopback addresses to dial from: A,B or A-B")
    p.add_argument("--data-dir", type=Path, default=OUT / "ads-data", help="bench.seed's nodes")
    p.add_argument("--server-arg", action="append", default=[], help="extra `controlplane serve` flag")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--py-spy", default="", help="py-spy binary: sample the server in --profile phases")
    p.add_argument("--profile", default="establish,fleet,storm", help="phases to sample with --py-spy")
    p.add_argument("--tag", default="", help="suffix for the result file name")
    p.add_argument("--report", nargs="+", type=Path, help="only print the tables of these result files")
    a = p.parse_args(argv)
    if a.report:
        for path in a.report:
            print(f"{path.name}\n\n{table(json.loads(path.read_text()))}\n")
        return
    for name in ("nodes", "rounds", "changes", "storms", "connections"):
        if getattr(a, name) < 1:
            raise SystemExit(f"--{name} must be at least 1")
    pin_self(CLIENT_CPU)
    res = asyncio.run(main_async(a))
    res["summary"] = text = table(res)
    path = write_json(result_name("ads", a, res["run_id"]), res)
    print(text)
    print(f"results: {path}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
