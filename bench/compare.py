"""Watch benchmark against etcd: the control plane, etcd and a bare grpc.aio server, measured
by the same load generator with the same scenarios in the same run, every figure published
as a ratio to etcd's.

    python -m bench.seed --nodes 1000                      # once per data directory
    python -m bench.compare --nodes 1000 --rounds 3
    make bench-etcd BENCH_ARGS="--nodes 10000 --rounds 3"

Targets (bench/targets.py): `etcd` (Debian's etcd 3.4, one member, default flags, on free
loopback ports in a temp directory), `controlplane` (`controlplane serve` on the seeded
data directory) and `bare` (bench/bareserver.py, the least work grpc.aio allows, one
process per core). Each round starts every target afresh, one after the other (the order
rotates between rounds), and runs the same phases against it:

  establish  N streams opened at one instant; time until all started, server CPU per stream
  idle       server memory per watcher = (Σ PSS of the server's processes with N streams -
             the same before any stream) / N; idle CPU rate
  fleet      `--changes` writes that every watcher sees, one at a time: time until all N
             have each (from the write's send and from its acknowledgement), server CPU per
             delivered change (net of the idle rate)
  storm      every stream cancelled at one instant and resumed from its cursor: time until
             all caught up, server CPU per reconnect, bootstraps (0 expected)
  writes     `--write-seconds` of back-to-back writes (`--write-concurrency` at a time)
             with the N watchers open: writes acknowledged per second, changes delivered
             per second, and time until every watcher has the last write

A write is an AssignBundle to the selector every benchmark node matches (control plane),
a Put on the one key every watcher watches (etcd), a Publish (bare). The control plane and
the bare server may coalesce a watcher's backlog into its newest state; etcd sends every
event, so "changes delivered" can differ where "writes" do not.

The load generator is the Go program bench/goloadgen/ (built at run time by bench/gobuild.py;
it costs a few µs per received message, where the Python one costs ~30 µs and would
compete with the server for this machine's cores); `--loadgen python` uses bench/loadgen.py
(WatchBundles only, for comparison). Streams are spread over `--connections` HTTP/2
connections (default 8 per core), the same number for every target, dialled from
`--source-addrs` round-robin. The medians over rounds are printed as a table and written
with every run's details to .bench-out/compare-n<N>-<run>.json; `--report FILE...` prints
the tables of result files again.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench import etcdapi, gobuild, procstat
from bench.common import OUT, machine, pin_self, quantiles, result_name, rotated, write_json
from bench.etcdapi import EtcdApi
from bench.targets import BareTarget, ControlPlaneTarget, EtcdTarget, Target
from bench.workers import Workers, merge_open

TARGET_NAMES = ("etcd", "controlplane", "bare")
# The control plane's hub freezes its heap 5 s after the last open, the bare server 2 s.
SETTLE_S = 8.0


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def cpu_of(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += procstat.cpu_seconds(pid)
    return total


def pss_of(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += procstat.pss_bytes(pid)
    return total


class Meter:
    """Server CPU (all its processes) and load-generator CPU at one moment."""

    def __init__(self, target: Target, workers: Workers):
        self.t = time.time()
        self.server = cpu_of(target.pids())
        self.client = workers.cpu()

    def to(self, later: Meter) -> tuple[float, float, float]:
        """(wall s, server CPU s, client CPU s) from this reading to `later`."""
        return later.t - self.t, later.server - self.server, later.client - self.client


def ms(x: float) -> float:
    return round(x * 1000, 1)


def parse_sources(spec: str) -> list[str]:
    """`127.0.0.2,127.0.0.3` or `127.0.0.2-127.0.0.9` (inclusive) → addresses."""
    out: list[str] = []
    for part in filter(None, spec.split(",")):
        first, _, last = part.partition("-")
        try:
            lo = ipaddress.IPv4Address(first.strip())
            hi = ipaddress.IPv4Address(last.strip()) if last else lo
        except ValueError as e:
            raise SystemExit(f"--source-addrs: {part!r}: {e}") from None
        if int(hi) < int(lo) or int(hi) - int(lo) > 1024:
            raise SystemExit(f"--source-addrs: {part!r} is not a range of at most 1,024 addresses")
        if not lo.is_loopback or not hi.is_loopback:
            raise SystemExit(f"--source-addrs: {part!r} is not on loopback (127.0.0.0/8)")
        out += [str(ipaddress.IPv4Address(i)) for i in range(int(lo), int(hi) + 1)]
    return out


class Run:
    """One target, one round: start it, run the phases, stop it."""

    def __init__(self, a: argparse.Namespace, target: Target, program: list[str], tag: str):
        self.a = a
        self.target = target
        self.program = program
        self.tag = tag
        self.workers = Workers()
        self.idle_rate = 0.0
        self.out: dict[str, Any] = {"target": target.name}

    async def go(self) -> dict[str, Any]:
        a, t = self.a, self.target
        say(f"{t.name}: starting")
        await t.start()
        try:
            self.out["info"] = t.info()
            self.out["server_processes"] = len(t.pids())
            await asyncio.sleep(2.0)
            pss0 = pss_of(t.pids())
            per_worker = max(1, a.connections // a.workers)
            sources = parse_sources(a.source_addrs)

            def extra(i: int) -> list[str]:
                if self.program[0] == sys.executable:
                    return []
                args = ["--proto", t.proto]
                if sources:
                    rotated = sources[i * per_worker :] + sources[: i * per_worker]
                    args += ["--source-addrs", ",".join(rotated)]
                if a.loadgen_profile:
                    args += ["--cpuprofile", str(OUT / f"loadgen-{self.tag}-{i}.pprof")]
                return args

            await self.workers.start(
                t.address,
                t.nodes(),
                a.workers,
                per_worker,
                OUT / f"compare-{self.tag}",
                cpus=a.client_cpus,
                program=self.program,
                extra_args=extra,
            )
            self.out["connections"] = per_worker * len(self.workers.procs)
            for phase in a.phases.split(","):
                await getattr(self, "phase_" + phase)(pss0)
            self.out["workers_rss_mib"] = round(self.workers.rss() / 2**20, 1)
        finally:
            await self.workers.stop()
            await t.stop()
        return self.out

    async def _open(self) -> dict[str, Any]:
        at = time.time() + 0.5
        reports = await self.workers.all("open", at=at, since="zero", retry="agent", timeout=self.a.timeout)
        return merge_open(reports, at)

    async def phase_establish(self, pss0: int) -> None:
        n = self.a.nodes
        m0 = Meter(self.target, self.workers)
        opened = await self._open()
        m1 = Meter(self.target, self.workers)
        _, server, client = m0.to(m1)
        self.out["establish"] = r = {
            "ready": opened["ready"],
            "errors": opened["errors"],
            "retries": opened["retries"],
            "modes": opened["modes"],
            "all_ready_s": None if opened["all_ready_s"] is None else round(opened["all_ready_s"], 3),
            "server_us_per_stream": round(server / n * 1e6, 1),
            "client_cpu_s": round(client, 3),
        }
        say(f"  establish: {r['ready']}/{n} in {r['all_ready_s']} s, {r['server_us_per_stream']} µs/stream")
        if opened["ready"] < n:
            raise RuntimeError(f"{self.target.name}: only {opened['ready']} of {n} streams started: {r}")

    async def phase_idle(self, pss0: int) -> None:
        await asyncio.sleep(SETTLE_S)
        m0 = Meter(self.target, self.workers)
        await asyncio.sleep(self.a.idle_window)
        m1 = Meter(self.target, self.workers)
        wall, server, _ = m0.to(m1)
        self.idle_rate = server / wall
        pss1 = pss_of(self.target.pids())
        self.out["idle"] = r = {
            "pss_before_mib": round(pss0 / 2**20, 1),
            "pss_mib": round(pss1 / 2**20, 1),
            "pss_kib_per_watcher": round((pss1 - pss0) / self.a.nodes / 1024, 2),
            "server_cpu_pct": round(self.idle_rate * 100, 2),
        }
        say(f"  idle: {r['pss_kib_per_watcher']} KiB/watcher (PSS), CPU {r['server_cpu_pct']} %")

    async def _receipts(self, revs: list[int]) -> dict[int, list[float]]:
        out: dict[int, list[float]] = {}
        for rep in await self.workers.all("receipts", revs=revs):
            for rev, times in rep["receipts"].items():
                out.setdefault(int(rev), []).extend(times)
        return out

    async def phase_fleet(self, pss0: int) -> None:
        a, t = self.a, self.target
        rev, _, _ = await t.write(f"{self.tag}-warmup")
        await self.workers.all("wait", rev=rev, need=-1, timeout=a.timeout)
        await asyncio.sleep(a.gap)
        rounds: list[tuple[int, float, float]] = []
        m0 = Meter(t, self.workers)
        for i in range(a.changes):
            rev, t0, t1 = await t.write(f"{self.tag}-{i}")
            await self.workers.all("wait", rev=rev, need=-1, timeout=a.timeout)
            rounds.append((rev, t0, t1))
            await asyncio.sleep(a.gap)
        m1 = Meter(t, self.workers)
        wall, server, client = m0.to(m1)
        receipts = await self._receipts([r for r, _, _ in rounds])
        delivered = sum(len(receipts.get(r, [])) for r, _, _ in rounds)
        from_send = [max(receipts[r]) - t0 for r, t0, _ in rounds if receipts.get(r)]
        from_ack = [max(receipts[r]) - t1 for r, _, t1 in rounds if receipts.get(r)]
        short = [r for r, _, _ in rounds if len(receipts.get(r, [])) < a.nodes]
        net = server - self.idle_rate * wall
        self.out["fleet"] = r = {
            "changes": a.changes,
            "delivered": delivered,
            "short_rounds": short,
            "all_ms_from_send": ms(statistics.median(from_send)) if from_send else None,
            "all_ms_from_send_max": ms(max(from_send)) if from_send else None,
            "all_ms_from_ack": ms(statistics.median(from_ack)) if from_ack else None,
            "write_ms": ms(statistics.median(t1 - t0 for _, t0, t1 in rounds)),
            "server_cpu_s": round(server, 3),
            "server_us_per_delivery": round(net / max(1, delivered) * 1e6, 2),
            "client_us_per_message": round(client / max(1, delivered) * 1e6, 2),
            "client_cpu_pct": round(client / wall * 100, 1),
        }
        say(
            f"  fleet: all have it {r['all_ms_from_send']} ms from send, "
            f"{r['server_us_per_delivery']} µs server CPU/delivery, "
            f"client {r['client_us_per_message']} µs/msg"
        )

    async def phase_storm(self, pss0: int) -> None:
        a, t = self.a, self.target
        runs = []
        for _ in range(a.storms):
            c0 = await t.counters()
            m0 = Meter(t, self.workers)
            at = time.time() + 0.5
            reports = await self.workers.all("storm", at=at, kind=a.storm, timeout=a.timeout)
            m1 = Meter(t, self.workers)
            c1 = await t.counters()
            merged = merge_open(reports, min(r["t_drop"] for r in reports))
            wall, server, client = m0.to(m1)
            q = quantiles(merged["ready_after"])
            runs.append(
                {
                    "ready": merged["ready"],
                    "errors": merged["errors"],
                    "retries": merged["retries"],
                    "modes": merged["modes"],
                    "caught_up_s": None if merged["all_ready_s"] is None else round(merged["all_ready_s"], 3),
                    "caught_up_p50_s": round(q["p50"], 3),
                    "server_us_per_reconnect": round((server - self.idle_rate * wall) / a.nodes * 1e6, 1),
                    "client_cpu_s": round(client, 3),
                    **{k: c1[k] - c0.get(k, 0.0) for k in c1},
                }
            )
            await asyncio.sleep(1.0)
        # Each figure's median over the storms stands for the run; every storm is kept.
        keys = {k for s in runs for k, v in s.items() if isinstance(v, int | float)}
        medians = {k: median_or_none([s.get(k) for s in runs]) for k in keys}
        medians = {k: None if v is None else round(v, 3) for k, v in medians.items()}
        self.out["storm"] = r = {**runs[0], **medians, "all": runs}
        say(
            f"  storm: caught up in {r['caught_up_s']} s, {r['server_us_per_reconnect']} µs/reconnect, "
            f"bootstraps {r.get('bootstraps', '-')}"
        )

    async def phase_writes(self, pss0: int) -> None:
        a, t = self.a, self.target
        stats0 = await self.workers.all("stats")
        m0 = Meter(t, self.workers)
        acked: list[tuple[int, float, float]] = []
        t_end = time.time() + a.write_seconds

        async def writer(k: int) -> None:
            i = 0
            while time.time() < t_end:
                acked.append(await t.write(f"{self.tag}-w{k}-{i}"))
                i += 1

        await asyncio.gather(*(writer(k) for k in range(a.write_concurrency)))
        last_rev, last_send, last_ack = max(acked)
        first_send = min(t0 for _, t0, _ in acked)
        last_acked = max(t1 for _, _, t1 in acked)
        got = await self.workers.all("wait", rev=last_rev, need=-1, timeout=a.timeout)
        m1 = Meter(t, self.workers)
        stats1 = await self.workers.all("stats")
        receipts = await self._receipts([last_rev])
        last_all = max(receipts.get(last_rev, [last_ack]))
        received = sum(s["received"] for s in stats1) - sum(s["received"] for s in stats0)
        wall, server, client = m0.to(m1)
        self.out["writes"] = r = {
            "writes": len(acked),
            "concurrency": a.write_concurrency,
            "writes_per_s": round(len(acked) / (last_acked - first_send), 1),
            "delivered": received,
            "delivered_per_s": round(received / (last_all - first_send), 1),
            # From the send: etcd's watchers often have the event before the Put's reply.
            "last_all_ms_from_send": ms(last_all - last_send),
            "last_all_ms_from_ack": ms(last_all - last_ack),
            "last_have": sum(g["count"] for g in got),
            "write_ms_p50": ms(quantiles([t1 - t0 for _, t0, t1 in acked])["p50"]),
            "write_ms_p99": ms(quantiles([t1 - t0 for _, t0, t1 in acked])["p99"]),
            "server_cpu_pct": round(server / wall * 100, 1),
            "client_cpu_pct": round(client / wall * 100, 1),
        }
        say(
            f"  writes: {r['writes_per_s']}/s acked, {r['delivered_per_s']} changes delivered/s, "
            f"last write everywhere {r['last_all_ms_from_send']} ms after its send"
        )


# -- the table ---------------------------------------------------------------------------

# (section, key, label, unit, shown as a ratio to etcd)
FIGURES: list[tuple[str, str, str, str, bool]] = [
    ("fleet", "all_ms_from_send", "one change to all: time until all have it, from send", "ms", True),
    ("fleet", "all_ms_from_ack", "  same, from the write's acknowledgement", "ms", True),
    ("storm", "caught_up_s", "reconnect storm: all caught up", "s", True),
    ("storm", "bootstraps", "  bootstraps in the storm", "", False),
    ("fleet", "server_us_per_delivery", "server CPU per delivered change", "µs", True),
    ("storm", "server_us_per_reconnect", "server CPU per reconnect", "µs", True),
    ("establish", "server_us_per_stream", "server CPU per new stream (burst)", "µs", True),
    ("establish", "all_ready_s", "  burst of N new streams: all started", "s", True),
    ("writes", "writes_per_s", "writes accepted per second (higher is better)", "/s", True),
    ("writes", "delivered_per_s", "  changes delivered per second", "/s", True),
    (
        "writes",
        "last_all_ms_from_send",
        "  last write: time until every watcher has it, from send",
        "ms",
        True,
    ),
    ("idle", "pss_kib_per_watcher", "memory per watcher (Σ PSS with N - without) / N", "KiB", True),
    ("idle", "server_cpu_pct", "  server CPU with N idle watchers", "%", True),
    ("fleet", "client_us_per_message", "load generator CPU per received change", "µs", False),
    ("fleet", "client_cpu_pct", "  load generator CPU during the changes (of one core)", "%", False),
]


def median_or_none(values: list[Any]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def median_of(runs: list[dict[str, Any]], section: str, key: str) -> float | None:
    return median_or_none([r[section].get(key) for r in runs if section in r])


def summarize(results: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float | None]]:
    return {
        name: {f"{section}.{key}": median_of(runs, section, key) for section, key, *_ in FIGURES}
        for name, runs in results.items()
    }


def fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    text = f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}" if unit == "s" else f"{v:.1f}"
    return f"{text} {unit}".strip()


def table(res: dict[str, Any]) -> str:
    medians: dict[str, dict[str, float | None]] = res["medians"]
    names = [n for n in TARGET_NAMES if n in medians]
    others = [n for n in names if n != "etcd"]
    head = ["figure", *names] + ([f"{n} / etcd" for n in others] if "etcd" in names else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, key in (("client connections", "connections"), ("server processes", "server_processes")):
        cells = [",".join(str(v) for v in sorted({r.get(key) for r in res["runs"][n]})) for n in names]
        lines.append("| " + " | ".join([label, *cells] + [""] * (len(head) - 1 - len(names))) + " |")
    for section, key, label, unit, ratio in FIGURES:
        k = f"{section}.{key}"
        row = [label, *(fmt(medians[n][k], unit) for n in names)]
        if "etcd" in names:
            base = medians["etcd"][k]
            for n in others:
                v = medians[n][k]
                # A ratio to zero or to a negative time (etcd's watchers can have a change
                # before the Put's reply) says nothing.
                row.append(f"{v / base:.2f}x" if ratio and v is not None and base and base > 0 else "")
        lines.append("| " + " | ".join(row) + " |")
    p = res["params"]
    lines += [
        "",
        f"N = {p['nodes']:,} watchers, one stream each; medians of {p['rounds']} interleaved round(s); "
        f"load generator: {p['loadgen']}, {p['workers']} process(es); the same connections for every figure.",
        "Ratios are target / etcd: below 1x is better than etcd, except for the per-second rows.",
    ]
    failed = {n: [r["error"] for r in res["runs"][n] if "error" in r] for n in names}
    lines += [f"FAILED runs of {n} (left out of the medians): {errs}" for n, errs in failed.items() if errs]
    return "\n".join(lines)


# -- main ---------------------------------------------------------------------------------


def make_target(name: str, a: argparse.Namespace, api: EtcdApi | None, tag: str) -> Target:
    if name == "etcd":
        assert api is not None
        return EtcdTarget(api, a.nodes, a.server_cpus, a.etcd_arg, tag)
    if name == "controlplane":
        return ControlPlaneTarget(a.nodes, a.data_dir, a.database_url, a.server_cpus, a.cp_arg, tag)
    return BareTarget(a.nodes, a.bare_processes, a.server_cpus, tag)


async def main_async(a: argparse.Namespace) -> dict[str, Any]:
    names = [n.strip() for n in a.targets.split(",") if n.strip()]
    bad = [n for n in names if n not in TARGET_NAMES]
    if bad or not names:
        raise SystemExit(f"--targets: unknown {bad or names}; choose from {', '.join(TARGET_NAMES)}")
    if a.loadgen == "python" and "etcd" in names:
        raise SystemExit("--loadgen python speaks WatchBundles only: drop etcd from --targets or use go")
    if a.loadgen == "python" and a.source_addrs:
        raise SystemExit("--source-addrs needs the Go load generator")
    api = etcdapi.load()
    program = [str(gobuild.build(api))] if a.loadgen == "go" else [sys.executable, "-m", "bench.loadgen"]
    run_id = time.strftime("%Y%m%d-%H%M%S")
    res: dict[str, Any] = {
        "run_id": run_id,
        "machine": machine(),
        "command": " ".join([os.path.basename(sys.executable), "-m", "bench.compare", *sys.argv[1:]]),
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "runs": {n: [] for n in names},
    }
    pin_self(a.client_cpus)
    for rnd, name in rotated(names, a.rounds):
        tag = f"{run_id}-r{rnd}-{name}"
        say(f"round {rnd + 1}/{a.rounds}, {name}")
        run = Run(a, make_target(name, a, api, tag), program, tag)
        try:
            await run.go()
        except Exception as e:  # keep the other targets' runs; the table shows the gap
            say(f"  {name} failed: {e!r}")
            run.out["error"] = repr(e)
        res["runs"][name].append(run.out)
        write_json(result_name("compare", a, run_id), res)  # a long run that dies keeps what it had
    res["medians"] = summarize(res["runs"])
    return res


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=1000, help="watchers (N), one stream each")
    p.add_argument("--targets", default=",".join(TARGET_NAMES))
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    p.add_argument("--phases", default="establish,idle,fleet,storm,writes")
    p.add_argument("--loadgen", choices=("go", "python"), default="go")
    p.add_argument("--workers", type=int, default=1, help="load-generator processes")
    p.add_argument(
        "--connections",
        type=int,
        default=8 * (os.cpu_count() or 1),
        help="HTTP/2 connections in all (default 8 per core: ≥ 8 per server process)",
    )
    p.add_argument("--loadgen-profile", action="store_true", help="Go generator: write pprof CPU profiles")
    p.add_argument("--source-addrs", default="", help="loopback addresses to dial from: A,B or A-B")
    # 20 changes of N deliveries: at N = 1,000 that is ≥ 200 ms of server CPU even for
    # etcd, enough 10 ms clock ticks for a per-delivery figure.
    p.add_argument("--changes", type=int, default=20, help="fleet-wide changes per run")
    p.add_argument("--gap", type=float, default=0.3, help="pause between changes, s")
    # Spans a bookmark wave (every ~15 s) and the control plane's drift sweeps (10 s).
    p.add_argument("--idle-window", type=float, default=15.0, help="s of idle CPU measurement")
    p.add_argument("--storm", choices=("streams", "channels"), default="streams")
    p.add_argument("--storms", type=int, default=2, help="storms per run (the median is reported)")
    p.add_argument("--write-seconds", type=float, default=5.0)
    p.add_argument("--write-concurrency", type=int, default=1, help="writers at a time")
    p.add_argument("--bare-processes", type=int, default=os.cpu_count() or 1)
    p.add_argument("--data-dir", type=Path, default=OUT / "data", help="the control plane's (bench.seed)")
    p.add_argument("--database-url", default="")
    p.add_argument("--cp-arg", action="append", default=[], help="extra `controlplane serve` flag")
    p.add_argument("--etcd-arg", action="append", default=[], help="extra etcd flag")
    p.add_argument("--server-cpus", default=None, help="taskset CPU list for every server (default: all)")
    p.add_argument("--client-cpus", default=None, help="taskset CPU list for the load generators")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--tag", default="", help="suffix for the result file name")
    p.add_argument("--report", nargs="+", type=Path, help="only print the tables of these result files")
    a = p.parse_args(argv)
    if a.report:
        for path in a.report:
            res = json.loads(path.read_text())
            res["medians"] = summarize(res["runs"])
            print(f"{path.name}: `{res['command']}` (git {res['machine'].get('git_head', '?')})\n")
            print(table(res) + "\n")
        return
    for name in ("nodes", "rounds", "workers", "connections", "changes", "storms", "write_concurrency"):
        if getattr(a, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1")
    res = asyncio.run(main_async(a))
    res["summary"] = text = table(res)
    path = write_json(result_name("compare", a, res["run_id"]), res)
    print(text)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
