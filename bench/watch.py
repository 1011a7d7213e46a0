"""WatchBundles benchmark: N streams against one `controlplane serve` process.

    python -m bench.seed  --nodes 10000                 # once per data directory
    python -m bench.watch --nodes 10000 --workers 4 --channels 1

One server process (pinned to CPU 0) and W load-generator processes (bench/loadgen.py,
pinned to CPU 1 with this orchestrator). Phases, in order:

  establish   all N streams opened at the same instant (bootstrap, since_revision=0)
  idle        server RSS per stream once the heap is frozen; idle CPU rate (bookmarks)
  fleet       R selector assignments that change every node, one at a time
  single      S node-id assignments, each to a different node, one at a time
  storm       every stream cancelled at the same instant and resumed from its cursor
              and epoch, `--storms` times in a row (`--storm channels`: the connections
              are closed and reopened too; `--storm-wait`: minimum age of the streams)
  paced       every stream closed, then reopened at `--paced-batch` per `--paced-interval`

Latency is the client's receive wall-clock time minus the moment AssignBundle returned
(the commit is acknowledged); the same minus the moment just before the call is also kept.
Server CPU is utime+stime of the server process from /proc; "per delivered change"
subtracts the idle rate over the same time. Client CPU (all load generators) is reported
beside every latency figure: a Python generator costs tens of µs per received message and
shares this 2-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import procstat, seed
from bench.common import (
    CLIENT_CPU,
    OUT,
    Operator,
    ServerProcess,
    bench_bundle,
    machine,
    metric_sum,
    pin_self,
    quantiles,
    wait_metric,
    write_json,
    written_at,
)
from bench.workers import Workers, merge_open

TARGETS: dict[str, Any] = {
    "us_per_delivery": 30.0,
    "rss_kib_per_stream": 40.0,
    "fleet_p99_ms": {1000: 100.0, 5000: None, 10000: 1000.0},
    "single_p99_ms": 20.0,
    "storm_s": 8.0,
    "storm_us_per_reconnect": 500.0,
    "storm_bootstraps": 0,
}


class Meter:
    """Server and client CPU, server RSS and server metrics at one moment."""

    def __init__(self, server: ServerProcess, workers: Workers, scrape: bool = True):
        # Metrics first: the scrape itself costs the server a little CPU.
        self.metrics = server.metrics() if scrape else {}
        self.t = time.time()
        self.server_cpu = procstat.cpu_seconds(server.pid)
        self.server_rss = procstat.rss_bytes(server.pid)
        self.client_cpu = workers.cpu() if workers.procs else 0.0
        self.threads = procstat.thread_cpu(server.pid)

    def delta(self, later: Meter, names: tuple[str, ...] = ()) -> dict[str, Any]:
        out: dict[str, Any] = {
            "wall_s": later.t - self.t,
            "server_cpu_s": later.server_cpu - self.server_cpu,
            "client_cpu_s": later.client_cpu - self.client_cpu,
            "server_rss_delta": later.server_rss - self.server_rss,
        }
        if later.metrics:
            for name in names:
                out[name] = metric_sum(later.metrics, name) - metric_sum(self.metrics, name)
        return out


# Seconds between samples of the storm timeline.
TIMELINE_STEP = 0.5
FAN_COUNT = "controlplane_watch_fanout_latency_seconds_count"
FAN_SUM = "controlplane_watch_fanout_latency_seconds_sum"
WATCH_COUNTERS = (
    "controlplane_watch_bootstraps_total",
    "controlplane_watch_resumes_total",
    "controlplane_watch_resets_total",
    "controlplane_watch_deliveries_total",
    "controlplane_watch_streams_rejected_total",
    "controlplane_watch_stream_overflows_total",
    "controlplane_watch_bookmarks_total",
    "controlplane_watch_fanout_latency_seconds_sum",
    "controlplane_watch_fanout_latency_seconds_count",
)


def ms(x: float) -> float:
    return round(x * 1000, 2)


def lat_summary(lat: list[float]) -> dict[str, float]:
    q = quantiles(lat)
    return {"n": q["n"], "p50_ms": ms(q["p50"]), "p99_ms": ms(q["p99"]), "max_ms": ms(q["max"])}


class Bench:
    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.run_id = time.strftime("%Y%m%d-%H%M%S")
        self.result: dict[str, Any] = {
            "run_id": self.run_id,
            "machine": machine(),
            "command": " ".join([os.path.basename(sys.executable), "-m", "bench.watch", *sys.argv[1:]]),
            "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
            "targets": {k: v for k, v in TARGETS.items() if k != "fleet_p99_ms"},
        }
        self.server = ServerProcess(
            a.data_dir,
            database_url=a.database_url,
            cpus=None if a.no_pin else "0",
            extra_args=["--bookmark-interval", str(a.bookmark_interval), *a.server_arg],
            log_path=OUT / f"server-{self.run_id}.log",
        )
        self.workers = Workers()
        self.idle_rate = 0.0  # server CPU seconds per second with N idle streams
        self.t_authenticated = 0.0

    def say(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    async def run(self) -> dict[str, Any]:
        a = self.a
        nodes = await seed.ensure(a.data_dir, a.nodes, database_url=a.database_url)
        if len(nodes) < a.nodes:
            raise SystemExit(f"only {len(nodes)} nodes seeded")
        pin_self(None if a.no_pin else CLIENT_CPU)
        self.server.start()
        self.result["server_command"] = " ".join(self.server.command)
        self.say(f"server pid {self.server.pid} on {self.server.target}; log {self.server.log_path}")
        op = Operator(self.server.target, a.data_dir)
        try:
            self.bundles = {
                name: await op.upload(bench_bundle(name)) for name in ("fleet-a", "fleet-b", "single")
            }
            self.op = op
            await self.workers.start(
                self.server.target,
                nodes,
                a.workers,
                a.channels,
                OUT / f"run-{self.run_id}",
                cpus=None if a.no_pin else CLIENT_CPU,
            )
            await asyncio.sleep(2.0)
            base = Meter(self.server, self.workers)
            self.result["baseline"] = {
                "server_rss_mib": round(base.server_rss / 2**20, 1),
                "server_threads": procstat.threads(self.server.pid),
            }
            for phase in a.phases.split(","):
                profiler = self._profile(phase) if phase in a.profile.split(",") else None
                try:
                    await getattr(self, "phase_" + phase)(base)
                finally:
                    if profiler is not None:
                        profiler.send_signal(signal.SIGINT)
                        profiler.wait(30)
            end = Meter(self.server, self.workers)
            self.result["server_threads_cpu_s"] = {
                k: round(v - base.threads.get(k, 0.0), 2) for k, v in end.threads.items()
            }
            self.result["workers_rss_mib"] = round(self.workers.rss() / 2**20, 1)
        finally:
            await op.close()
            await self.workers.stop()
            code = self.server.stop()
            self.result["server_exit"] = code
        return self.result

    def _profile(self, phase: str) -> subprocess.Popen[bytes]:
        """Sample the server with py-spy (collapsed stacks) while `phase` runs."""
        out = OUT / f"profile-{self.run_id}-{phase}.txt"
        self.say(f"  profiling the server into {out}")
        cmd = [self.a.py_spy, "record", "--pid", str(self.server.pid), "--rate", "200", "--nonblocking"]
        cmd += ["--format", "raw", "--threads", "--output", str(out)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        return proc

    # -- phases ----------------------------------------------------------------------

    async def _open(self, batch_total: int = 0, interval: float = 0.0) -> dict[str, Any]:
        at = time.time() + 0.5
        per_worker = max(1, batch_total // self.a.workers) if batch_total else 0
        reports = await self.workers.all(
            "open",
            at=at,
            since="zero",
            batch=per_worker,
            interval=interval,
            retry="agent",
            timeout=self.a.timeout,
        )
        return merge_open(reports, at)

    def _establish_report(self, opened: dict[str, Any], m0: Meter, m1: Meter) -> dict[str, Any]:
        d = m0.delta(m1, WATCH_COUNTERS)
        n = self.a.nodes
        q = quantiles(opened["ready_after"])
        return {
            "ready": opened["ready"],
            "pending": opened["pending"],
            "errors": opened["errors"],
            "retries": opened["retries"],
            "modes": opened["modes"],
            "all_ready_s": None if opened["all_ready_s"] is None else round(opened["all_ready_s"], 3),
            "ready_p50_s": round(q["p50"], 3),
            "ready_p99_s": round(q["p99"], 3),
            "server_cpu_s": round(d["server_cpu_s"], 3),
            "server_us_per_stream": round(d["server_cpu_s"] / n * 1e6, 1),
            "client_cpu_s": round(d["client_cpu_s"], 3),
            "bootstraps": d["controlplane_watch_bootstraps_total"],
            "resumes": d["controlplane_watch_resumes_total"],
            "rejected": d["controlplane_watch_streams_rejected_total"],
        }

    async def phase_establish(self, base: Meter) -> None:
        self.say(f"establish: {self.a.nodes} streams at once")
        m0 = Meter(self.server, self.workers)
        opened = await self._open()
        m1 = Meter(self.server, self.workers)
        self.t_authenticated = time.time()
        self.result["establish_burst"] = r = self._establish_report(opened, m0, m1)
        self.say(f"  all {r['ready']} ready in {r['all_ready_s']} s, errors {r['errors']}")
        if opened["ready"] < self.a.nodes:
            raise SystemExit(f"only {opened['ready']} of {self.a.nodes} streams started: {r}")

    async def phase_idle(self, base: Meter) -> None:
        # The hub freezes the heap 5 s after the last open (HubSettings.gc_settle).
        self.say("idle: waiting for the heap to settle")
        await asyncio.sleep(8.0)
        m0 = Meter(self.server, self.workers)
        await asyncio.sleep(self.a.idle_window)
        m1 = Meter(self.server, self.workers)
        d = m0.delta(m1, WATCH_COUNTERS)
        self.idle_rate = d["server_cpu_s"] / d["wall_s"]
        n = self.a.nodes
        rss = m1.server_rss - base.server_rss
        self.result["idle"] = r = {
            "server_rss_mib": round(m1.server_rss / 2**20, 1),
            "rss_delta_mib": round(rss / 2**20, 1),
            "rss_kib_per_stream": round(rss / n / 1024, 2),
            "server_cpu_pct": round(self.idle_rate * 100, 2),
            "bookmarks_per_s": round(d["controlplane_watch_bookmarks_total"] / d["wall_s"], 1),
            "streams_open": metric_sum(m1.metrics, "controlplane_watch_streams_open"),
        }
        self.say(f"  {r['rss_kib_per_stream']} KiB/stream, idle CPU {r['server_cpu_pct']} %")

    async def _fleet_round(self, digest: str, tag: str) -> tuple[int, float, float, dict[str, Any]]:
        rev, t0, t1 = await self.op.assign(
            digest, selector="env=bench", annotations={"bench-round": f"{self.run_id}-{tag}"}
        )
        waits = await self.workers.all("wait", rev=rev, need=-1, timeout=self.a.timeout)
        return rev, t0, t1, {"count": sum(w["count"] for w in waits), "need": sum(w["need"] for w in waits)}

    async def phase_fleet(self, base: Meter) -> None:
        a = self.a
        self.say(f"fleet: warm-up + {a.rounds} selector assignments to all {a.nodes} nodes")
        await self._fleet_round(self.bundles["single"], "warmup")
        await asyncio.sleep(0.5)
        rounds: list[tuple[int, float, float]] = []
        short: list[dict[str, Any]] = []
        m0 = Meter(self.server, self.workers)
        for i in range(a.rounds):
            digest = self.bundles["fleet-a" if i % 2 == 0 else "fleet-b"]
            rev, t0, t1, got = await self._fleet_round(digest, str(i))
            rounds.append((rev, t0, t1))
            if got["count"] < got["need"]:
                short.append({"rev": rev, **got})
            await asyncio.sleep(a.gap)
        m1 = Meter(self.server, self.workers)
        d = m0.delta(m1, WATCH_COUNTERS)
        receipts = await self._receipts([rev for rev, _, _ in rounds])
        written = await written_at(a.data_dir, a.database_url, [rev for rev, _, _ in rounds])
        latw: list[float] = []
        lat1: list[float] = []
        lat0: list[float] = []
        per_round: list[dict[str, Any]] = []
        for rev, t0, t1 in rounds:
            times = receipts.get(rev, [])
            lat1 += [t - t1 for t in times]
            lat0 += [t - t0 for t in times]
            if rev in written:
                latw += [t - written[rev] for t in times]
            all_ms = ms(max(times) - t1) if times else None
            per_round.append({"rev": rev, "n": len(times), "all_ms": all_ms, "rpc_ms": ms(t1 - t0)})
        deliveries = d["controlplane_watch_deliveries_total"]
        net_cpu = d["server_cpu_s"] - self.idle_rate * d["wall_s"]
        messages = sum(len(receipts.get(rev, [])) for rev, _, _ in rounds)
        fan = d["controlplane_watch_fanout_latency_seconds_count"]
        self.result["fleet"] = r = {
            "rounds": a.rounds,
            "deliveries": deliveries,
            "received": messages,
            "short_rounds": short,
            "latency_from_write": lat_summary(latw),
            "latency_from_ack": lat_summary(lat1),
            "latency_from_call": lat_summary(lat0),
            "all_ms_median_round": sorted(x["all_ms"] or 0 for x in per_round)[len(per_round) // 2],
            "assign_rpc_ms_median": sorted(x["rpc_ms"] for x in per_round)[len(per_round) // 2],
            "hub_fanout_ms_mean": (
                ms(d["controlplane_watch_fanout_latency_seconds_sum"] / fan) if fan else None
            ),
            "server_cpu_s": round(d["server_cpu_s"], 3),
            "wall_s": round(d["wall_s"], 2),
            "server_us_per_delivery": round(net_cpu / max(1, deliveries) * 1e6, 1),
            "client_cpu_s": round(d["client_cpu_s"], 3),
            "client_cpu_ms_per_round": ms(d["client_cpu_s"] / a.rounds),
            "client_us_per_message": round(d["client_cpu_s"] / max(1, messages) * 1e6, 1),
            "per_round": per_round,
        }
        self.say(
            f"  p50/p99/max {r['latency_from_ack']['p50_ms']}/{r['latency_from_ack']['p99_ms']}/"
            f"{r['latency_from_ack']['max_ms']} ms; {r['server_us_per_delivery']} µs server CPU/delivery; "
            f"client {r['client_us_per_message']} µs/msg"
        )

    async def _receipts(self, revs: list[int]) -> dict[int, list[float]]:
        out: dict[int, list[float]] = {}
        for rep in await self.workers.all("receipts", revs=revs):
            for rev, times in rep["receipts"].items():
                out.setdefault(int(rev), []).extend(times)
        return out

    async def phase_single(self, base: Meter) -> None:
        a = self.a
        count = min(a.single_rounds, a.nodes)
        self.say(f"single: {count} node-id assignments while {a.nodes} streams are open")
        rng = random.Random(a.seed)
        picks: list[tuple[int, str]] = []
        for w, part in enumerate(self.workers.slices):
            picks += [(w, n["node_id"]) for n in part]
        picks = rng.sample(picks, count)
        rounds: list[tuple[int, int, float, float]] = []
        missing = 0
        m0 = Meter(self.server, self.workers)
        for i, (w, node_id) in enumerate(picks):
            rev, t0, t1 = await self.op.assign(
                self.bundles["single"], nodes=[node_id], annotations={"bench-round": f"{self.run_id}-s{i}"}
            )
            got = await self.workers.call(w, "wait", rev=rev, need=1, timeout=10.0)
            missing += got["count"] < 1
            rounds.append((w, rev, t0, t1))
            await asyncio.sleep(a.single_gap)
        m1 = Meter(self.server, self.workers)
        d = m0.delta(m1, WATCH_COUNTERS)
        receipts = await self._receipts([rev for _, rev, _, _ in rounds])
        written = await written_at(a.data_dir, a.database_url, [rev for _, rev, _, _ in rounds])
        latw = [
            receipts[rev][0] - written[rev] for _, rev, _, _ in rounds if receipts.get(rev) and rev in written
        ]
        lat1 = [receipts[rev][0] - t1 for _, rev, _, t1 in rounds if receipts.get(rev)]
        lat0 = [receipts[rev][0] - t0 for _, rev, t0, _ in rounds if receipts.get(rev)]
        rpc = sorted(t1 - t0 for _, _, t0, t1 in rounds)
        net_cpu = d["server_cpu_s"] - self.idle_rate * d["wall_s"]
        self.result["single"] = r = {
            "rounds": count,
            "missing": missing,
            "deliveries": d["controlplane_watch_deliveries_total"],
            "latency_from_write": lat_summary(latw),
            "latency_from_ack": lat_summary(lat1),
            "latency_from_call": lat_summary(lat0),
            "assign_rpc_ms": {"p50": ms(rpc[len(rpc) // 2]), "p99": ms(quantiles(rpc)["p99"])},
            "server_ms_per_change": round(net_cpu / count * 1e3, 3),
            "hub_fanout_ms_mean": ms(d[FAN_SUM] / d[FAN_COUNT]) if d[FAN_COUNT] else None,
            "client_cpu_s": round(d["client_cpu_s"], 3),
            "client_cpu_pct": round(d["client_cpu_s"] / d["wall_s"] * 100, 1),
            "wall_s": round(d["wall_s"], 2),
        }
        self.say(
            f"  p50/p99/max {r['latency_from_ack']['p50_ms']}/{r['latency_from_ack']['p99_ms']}/"
            f"{r['latency_from_ack']['max_ms']} ms; {r['server_ms_per_change']} ms server CPU per change"
        )
        if "fleet" in self.result and r["server_ms_per_change"] > 0:
            # Per-commit overhead (AssignBundle, the hub's read) is in both phases: take it
            # out of the fleet rounds to get the marginal cost of one delivery.
            f = self.result["fleet"]
            per_round = r["server_ms_per_change"] / 1e3
            net = f["server_cpu_s"] - self.idle_rate * f["wall_s"] - per_round * f["rounds"]
            f["server_us_per_delivery_net_of_commit"] = round(net / max(1, f["deliveries"]) * 1e6, 1)

    async def _storm(self, kind: str, label: str) -> None:
        a = self.a
        self.say(f"storm ({label}): all {a.nodes} streams dropped ({kind}) and resumed at once")
        m0 = Meter(self.server, self.workers)
        at = time.time() + 0.5
        sampler = asyncio.get_running_loop().create_task(self._sample(at))
        reports = await self.workers.all("storm", at=at, kind=kind, timeout=a.timeout)
        m1 = Meter(self.server, self.workers, scrape=False)
        sampler.cancel()
        timeline = await sampler
        open_now = await wait_metric(
            self.server, "controlplane_watch_streams_open", lambda v: v == a.nodes, within=30.0
        )
        m2 = Meter(self.server, self.workers)
        t_drop = min(r["t_drop"] for r in reports)
        merged = merge_open(reports, t_drop)
        d = m0.delta(m1)
        counters = m0.delta(m2, WATCH_COUNTERS)
        net = d["server_cpu_s"] - self.idle_rate * d["wall_s"]
        q = quantiles(merged["ready_after"])
        ready_bins: dict[int, int] = {}
        for t in merged["ready_after"]:
            ready_bins[int(t / TIMELINE_STEP)] = ready_bins.get(int(t / TIMELINE_STEP), 0) + 1
        for row in timeline:
            row["ready"] = ready_bins.get(round(row["t"] / TIMELINE_STEP) - 1, 0)
        self.result[f"storm_{label}"] = r = {
            "timeline": timeline,
            "kind": kind,
            "ready": merged["ready"],
            "pending": merged["pending"],
            "errors": merged["errors"],
            "retries": merged["retries"],
            "modes": merged["modes"],
            "caught_up_s": None if merged["all_ready_s"] is None else round(merged["all_ready_s"], 3),
            "caught_up_p50_s": round(q["p50"], 3),
            "bootstraps": counters["controlplane_watch_bootstraps_total"],
            "resumes": counters["controlplane_watch_resumes_total"],
            "resets": counters["controlplane_watch_resets_total"],
            "rejected": counters["controlplane_watch_streams_rejected_total"],
            "server_cpu_s": round(d["server_cpu_s"], 3),
            "server_us_per_reconnect": round(net / a.nodes * 1e6, 1),
            "client_cpu_s": round(d["client_cpu_s"], 3),
            "streams_open_after": open_now,
            "since_open_s": round(at - self.t_authenticated, 1),
        }
        self.say(
            f"  caught up in {r['caught_up_s']} s; bootstraps {r['bootstraps']}; "
            f"{r['server_us_per_reconnect']} µs server CPU/reconnect; errors {r['errors']}"
        )

    async def _sample(self, t0: float) -> list[dict[str, float]]:
        """Server and client CPU every TIMELINE_STEP s from `t0` until cancelled: shows
        whether a slow phase is CPU-bound on either side or waiting."""
        rows: list[dict[str, float]] = []
        await asyncio.sleep(max(0.0, t0 - time.time()))
        last = (procstat.cpu_seconds(self.server.pid), self.workers.cpu())
        try:
            while True:
                await asyncio.sleep(TIMELINE_STEP)
                now = (procstat.cpu_seconds(self.server.pid), self.workers.cpu())
                rows.append(
                    {
                        "t": round(time.time() - t0, 2),
                        "server_cpu": round((now[0] - last[0]) / TIMELINE_STEP, 2),
                        "client_cpu": round((now[1] - last[1]) / TIMELINE_STEP, 2),
                    }
                )
                last = now
        except asyncio.CancelledError:
            return rows

    async def phase_storm(self, base: Meter) -> None:
        kinds = ["streams", "channels"] if self.a.storm == "both" else [self.a.storm]
        for kind in kinds:
            # Optionally let any server-side cache of verified identities expire first,
            # the way it has in a real storm (servers before node tokens cached node
            # credentials for 30 s: `--storm-wait 31` reproduces the cold case).
            wait = self.t_authenticated + self.a.storm_wait - time.time()
            if wait > 0:
                self.say(f"  waiting {wait:.0f} s before the storm")
                await asyncio.sleep(wait)
            for i in range(1, self.a.storms + 1):
                await self._storm(kind, f"{i}_{kind}")
                await asyncio.sleep(1.0)
            self.t_authenticated = time.time()

    async def phase_paced(self, base: Meter) -> None:
        a = self.a
        if not a.paced_batch:
            return
        self.say("paced: closing every stream")
        await self.workers.all("close")
        await wait_metric(self.server, "controlplane_watch_streams_open", lambda v: v == 0, within=30.0)
        self.say(f"paced: reopening {a.paced_batch} every {a.paced_interval} s")
        m0 = Meter(self.server, self.workers)
        opened = await self._open(a.paced_batch, a.paced_interval)
        m1 = Meter(self.server, self.workers)
        self.result["establish_paced"] = r = self._establish_report(opened, m0, m1)
        r["schedule_s"] = round((a.nodes / a.paced_batch - 1) * a.paced_interval, 2)
        self.say(f"  all {r['ready']} ready in {r['all_ready_s']} s (schedule {r['schedule_s']} s)")


def summary(res: dict[str, Any]) -> str:
    n = res["params"]["nodes"]
    lines = [f"WatchBundles benchmark, N={n}, run {res['run_id']}", res["command"]]

    def row(name: str, target: str, measured: str) -> None:
        lines.append(f"  {name:<44} target {target:<12} measured {measured}")

    if "establish_burst" in res:
        e = res["establish_burst"]
        cpu = e["server_us_per_stream"]
        row("time to establish (burst)", "-", f"{e['all_ready_s']} s ({cpu} µs server CPU/stream)")
    if "establish_paced" in res:
        e = res["establish_paced"]
        row("time to establish (paced)", "-", f"{e['all_ready_s']} s (schedule {e['schedule_s']} s)")
    if "idle" in res:
        row("server RSS per idle stream", "≤ 40 KiB", f"{res['idle']['rss_kib_per_stream']} KiB")
    if "fleet" in res:
        f = res["fleet"]
        t = TARGETS["fleet_p99_ms"].get(n)
        la = f.get("latency_from_write") or f["latency_from_ack"]
        row("server CPU per delivered change", "≤ 30 µs", f"{f['server_us_per_delivery']} µs")
        row(
            "fleet-wide change from write p50/p99/max",
            f"p99 ≤ {t} ms" if t else "-",
            f"{la['p50_ms']}/{la['p99_ms']}/{la['max_ms']} ms"
            f" (client CPU {f['client_cpu_ms_per_round']} ms/round)",
        )
    if "single" in res:
        s = res["single"]
        la = s.get("latency_from_write") or s["latency_from_ack"]
        row(
            "single-node change from write p50/p99/max",
            "p99 ≤ 20 ms",
            f"{la['p50_ms']}/{la['p99_ms']}/{la['max_ms']} ms (client CPU {s['client_cpu_pct']} %)",
        )
    for key in sorted(k for k in res if k.startswith("storm_")):
        s = res[key]
        row(
            f"reconnect storm {key[6:]}",
            "≤ 8 s, 0 boot",
            f"{s['caught_up_s']} s, {s['bootstraps']:.0f} bootstraps,"
            f" {s['server_us_per_reconnect']} µs/reconnect",
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=1000, help="streams (N)")
    p.add_argument("--workers", type=int, default=4, help="load-generator processes")
    p.add_argument("--channels", type=int, default=1, help="channels (HTTP/2 connections) per worker")
    p.add_argument("--rounds", type=int, default=20, help="fleet-wide changes")
    p.add_argument("--single-rounds", type=int, default=200, help="single-node changes")
    p.add_argument("--gap", type=float, default=0.3, help="pause between fleet rounds, s")
    p.add_argument("--single-gap", type=float, default=0.02, help="pause between single-node rounds, s")
    p.add_argument("--idle-window", type=float, default=30.0, help="s; spans drift sweeps and bookmark waves")
    p.add_argument("--storm", choices=("streams", "channels", "both"), default="streams")
    p.add_argument("--storms", type=int, default=2, help="storms in a row (per kind)")
    p.add_argument("--storm-wait", type=float, default=0.0, help="min s between opening and the storm")
    p.add_argument("--paced-batch", type=int, default=200, help="0 skips the paced phase")
    p.add_argument("--paced-interval", type=float, default=0.3)
    p.add_argument("--phases", default="establish,idle,fleet,single,storm,paced")
    p.add_argument("--data-dir", type=Path, default=OUT / "data")
    p.add_argument("--database-url", default="")
    p.add_argument("--bookmark-interval", type=float, default=15.0)
    p.add_argument("--server-arg", action="append", default=[], help="extra `serve` argument")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--no-pin", action="store_true", help="do not pin server and clients to cores")
    p.add_argument("--tag", default="", help="suffix for the result file name")
    p.add_argument("--profile", default="", help="phases to sample the server in with py-spy")
    p.add_argument("--py-spy", default="py-spy", help="py-spy binary (not a project dependency)")
    a = p.parse_args(argv)
    res = asyncio.run(Bench(a).run())
    text = summary(res)
    res["summary"] = text
    path = write_json(f"watch-n{a.nodes}-{res['run_id']}{'-' + a.tag if a.tag else ''}.json", res)
    print(text)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
