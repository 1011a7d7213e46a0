"""The burst stall: open many WatchBundles streams at one instant and see which ones start.

    python -m bench.stall                      # every scenario below
    python -m bench.stall --scenarios A,E --window 90

Each scenario starts a fresh server on CPU 0 and W load-generator processes on CPU 1
(bench/loadgen.py), opens the streams at one agreed instant (or paced), and after
`--window` seconds reports per stream: started (got its first message), failed (with the
status code and details the client saw, and when), or still pending (neither: a true hang).
The bare server (bench/stallserver.py) counts its handler entries, so the client's view
can be checked against the server's.

Scenarios:
  A  bare server, grpc default options, 4,000 at once, no retry       (the issue's probe)
  B  bare server, default options, 5,000 paced 200 every 0.3 s, no retry
  C  bare server, default options, 10,000 at once, no retry
  D  bare server, default options, 10,000 at once, agent retry (full jitter 0.5 s → 30 s)
  E  bare server, max_pending_requests 65,536 / hard 131,072, 10,000 at once, no retry
  F  bare server, same options, 10,000 at once from ONE process over ONE channel
  G  controlplane serve (its own options), 10,000 at once, no retry (needs bench.seed)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from bench import procstat, seed
from bench.common import (
    CLIENT_CPU,
    OUT,
    SERVER_CPU,
    ServerProcess,
    machine,
    pin_self,
    pinned,
    quantiles,
    write_json,
)
from bench.workers import Workers, merge_open


@dataclass(frozen=True)
class Scenario:
    name: str
    server: str  # "bare" or "controlplane"
    max_pending: int
    streams: int
    workers: int = 4
    channels: int = 1
    batch: int = 0  # total streams per interval; 0 = all at once
    interval: float = 0.0
    retry: str = "none"


SCENARIOS = {
    "A": Scenario("A", "bare", 0, 4000),
    "B": Scenario("B", "bare", 0, 5000, batch=200, interval=0.3),
    "C": Scenario("C", "bare", 0, 10000),
    "D": Scenario("D", "bare", 0, 10000, retry="agent"),
    "E": Scenario("E", "bare", 65536, 10000),
    "F": Scenario("F", "bare", 65536, 10000, workers=1, channels=1),
    "G": Scenario("G", "controlplane", 65536, 10000),
}


class BareServer:
    def __init__(self, max_pending: int, log: Path, trace: bool):
        self.max_pending = max_pending
        self.log = log
        env = dict(os.environ)
        if trace:
            env.update(GRPC_TRACE="call_error", GRPC_VERBOSITY="debug")
        cmd = [sys.executable, "-m", "bench.stallserver", "--port", "0", "--max-pending", str(max_pending)]
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                pinned(cmd, SERVER_CPU), stdout=out, stderr=subprocess.STDOUT, env=env
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            m = re.search(r"\(port (\d+)\)", log.read_text(errors="replace"))
            if m:
                self.port = int(m.group(1))
                return
            time.sleep(0.1)
        raise TimeoutError("stallserver did not start")

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stats(self) -> dict[str, Any]:
        async with grpc.aio.insecure_channel(self.target) as ch:
            raw = await ch.unary_unary("/bench.Stall/Stats")(b"", timeout=30)
        out: dict[str, Any] = json.loads(raw)
        return out

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def trace_cancels(self) -> int:
        return self.log.read_text(errors="replace").count("CancelWithError SVR")


async def run(sc: Scenario, window: float, data_dir: Path, trace: bool) -> dict[str, Any]:
    run_dir = OUT / f"stall-{time.strftime('%Y%m%d-%H%M%S')}-{sc.name}"
    run_dir.mkdir(parents=True, exist_ok=True)
    bare: BareServer | None = None
    cp: ServerProcess | None = None
    if sc.server == "bare":
        bare = BareServer(sc.max_pending, run_dir / "server.log", trace)
        target, pid = bare.target, bare.pid
        nodes = [{"node_id": f"n-{i:05d}"} for i in range(sc.streams)]
    else:
        nodes = await seed.ensure(data_dir, sc.streams)
        cp = ServerProcess(data_dir, cpus=SERVER_CPU, log_path=run_dir / "server.log")
        cp.start()
        target, pid = cp.target, cp.pid
    workers = Workers()
    try:
        await workers.start(target, nodes, sc.workers, sc.channels, run_dir, cpus=CLIENT_CPU)
        await asyncio.sleep(1.0)
        cpu0, ccpu0 = procstat.cpu_seconds(pid), workers.cpu()
        at = time.time() + 0.5
        per_worker = max(1, sc.batch // sc.workers) if sc.batch else 0
        reports = await workers.all(
            "open",
            at=at,
            since="zero",
            batch=per_worker,
            interval=sc.interval,
            retry=sc.retry,
            timeout=window,
        )
        cpu1, ccpu1 = procstat.cpu_seconds(pid), workers.cpu()
        merged = merge_open(reports, at)
        server_view: dict[str, Any] = {}
        if bare is not None:
            server_view = await bare.stats()
            if trace:
                server_view["trace_cancel_with_error"] = bare.trace_cancels()
        elif cp is not None:
            m = cp.metrics()
            server_view = {
                "streams_open": m.get("controlplane_watch_streams_open"),
                "bootstraps": m.get("controlplane_watch_bootstraps_total"),
            }
        fq = quantiles(merged["failed_after"])
        result = {
            "scenario": sc.__dict__,
            "window_s": window,
            "started": merged["ready"],
            "failed": merged["failed"],
            "pending_after_window": merged["pending"],
            "failure_details": merged["details"],
            "errors_incl_retried": merged["errors"],
            "retries": merged["retries"],
            "failed_after_s": {"p50": round(fq["p50"], 3), "max": round(fq["max"], 3)},
            "all_started_s": None if merged["all_ready_s"] is None else round(merged["all_ready_s"], 3),
            "server": server_view,
            "server_cpu_s": round(cpu1 - cpu0, 2),
            "client_cpu_s": round(ccpu1 - ccpu0, 2),
        }
    finally:
        await workers.stop()
        if bare is not None:
            bare.stop()
        if cp is not None:
            cp.stop()
    return result


def line(r: dict[str, Any]) -> str:
    sc = r["scenario"]
    how = f"{sc['batch']}/{sc['interval']}s" if sc["batch"] else "at once"
    opts = f"pending {sc['max_pending']}" if sc["max_pending"] else "grpc defaults"
    return (
        f"{sc['name']}: {sc['server']:<12} {opts:<14} {sc['streams']:>6} {how:<10} retry={sc['retry']:<5} "
        f"{sc['workers']}x{sc['channels']}ch → started {r['started']}, failed {r['failed']} "
        f"(after p50 {r['failed_after_s']['p50']} s, max {r['failed_after_s']['max']} s), "
        f"pending {r['pending_after_window']}, all started in {r['all_started_s']} s; server {r['server']}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", default="A,B,C,D,E,F,G")
    p.add_argument("--window", type=float, default=30.0, help="seconds to wait for every stream")
    p.add_argument("--data-dir", type=Path, default=OUT / "data")
    p.add_argument("--trace", action="store_true", help="GRPC_TRACE=call_error on the bare server")
    a = p.parse_args()
    pin_self(CLIENT_CPU)
    results = []
    for name in a.scenarios.split(","):
        sc = SCENARIOS[name]
        print(f"[{time.strftime('%H:%M:%S')}] scenario {name}: {sc}", flush=True)
        window = a.window if sc.retry == "none" else max(a.window, 60.0)
        r = asyncio.run(run(sc, window, a.data_dir, a.trace))
        print("  " + line(r), flush=True)
        results.append(r)
    out: dict[str, Any] = {
        "machine": machine(),
        "command": " ".join(["python", "-m", "bench.stall", *sys.argv[1:]]),
    }
    out["results"] = results
    path = write_json(f"stall-{time.strftime('%Y%m%d-%H%M%S')}.json", out)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
