"""Failover benchmark (issue 12): how long each kind of failure keeps the fleet waiting.

    python -m bench.failover --runs 5 --agents 1000            # every scenario
    python -m bench.failover --scenario restart --agents 1000   # one of them

Three scenarios, each run `--runs` times (medians reported, every run kept in the JSON):

promotion   A private PostgreSQL primary and streaming standby (tests/support/pgcluster.py,
            `--async` for asynchronous replication), one `controlplane serve` on a URL
            naming both, `--promotion-agents` simulated agents running a bundle. The
            primary is SIGKILLed and the standby promoted at once. Timeline, from the kill:
            promotion visible (pg_is_in_recovery() false), first write accepted (an
            AssignBundle retried every 20 ms), first agent in the new epoch, every agent
            caught up (new epoch, cursor at or past that write). The write's delay is also
            given from the promotion becoming visible (target ≤ 1 s).
takeover    Two replicas on one PostgreSQL (the machine's), a rollout led by replica A
            with a long bake, agents on replica B. A is SIGKILLed; the time until B holds
            the rollout's lease (polled in the leases table), target ≤ 3 s.
restart     One server (SQLite) on a fixed port and `--agents` simulated agents. The
            server is stopped (SIGTERM, or SIGKILL with `--kill`), left down for
            `--outage` seconds and started again; per agent, the time from the server
            serving again to its stream delivering again: p50/p99/max (target ≤ 3 s).

The simulated agents are the real agent code (watch loop, reconnects, backoff) in this
process, sharing its core with the orchestration: their CPU over each window is reported
beside the timings. Timings are wall clock on one machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg

from agent_stub.backoff import BackoffPolicy
from agent_stub.simulator import FleetConfig, FleetSimulator
from bench import procstat
from bench.common import Operator, ServerProcess, bench_bundle, free_port, machine, quantiles, write_json
from controlplane.api.rollout.v1 import rollout_pb2 as rpb
from controlplane.api.rollout.v1 import rollout_pb2_grpc
from tests.support import postgres
from tests.support.pgcluster import PgCluster

POLL = 0.01


def say(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


async def until(check: Callable[[], bool], within: float, what: str) -> float:
    """Poll `check` every POLL seconds; the monotonic time it first held."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {within}s")
        await asyncio.sleep(POLL)
    return time.monotonic()


def fleet(target: str, token: str, agents: int, prefix: str) -> FleetSimulator:
    return FleetSimulator(
        FleetConfig(
            server=target,
            project="default",
            token=token,
            nodes=agents,
            labels={"env": "bench"},
            name_prefix=prefix,
            heartbeat_interval=10.0,
            rpc_timeout=60.0,
            # The agents' own defaults: what is measured is what a fleet would do.
            backoff=BackoffPolicy(),
        )
    )


def server_token(data_dir: Path) -> str:
    return (data_dir / "enrollment-token").read_text().strip()


# -- promotion -----------------------------------------------------------------------------


async def promotion_run(agents: int, synchronous: bool, work: Path) -> dict[str, Any]:
    cluster = await PgCluster.create(synchronous)
    server = ServerProcess(work / "data", database_url=cluster.url(), cpus=None)
    sim: FleetSimulator | None = None
    operator: Operator | None = None
    try:
        await asyncio.to_thread(server.start)
        operator = Operator(server.target, server.data_dir)
        sim = fleet(server.target, server_token(server.data_dir), agents, "promo")
        await sim.start()
        await sim.wait_registered(within=300)
        digest = await operator.upload(bench_bundle("promotion"))
        await operator.assign(digest, selector="env=bench")
        nodes = sim.nodes
        await until(lambda: all(n.digest == digest for n in nodes), 120, "every agent on the bundle")
        first_agent = nodes[0].agent
        old_epoch = first_agent.cursor.epoch if first_agent is not None else ""

        cpu0 = procstat.cpu_seconds(os.getpid())
        killed = time.monotonic()
        cluster.kill_primary()
        await cluster.promote()
        assert cluster.promoted_at is not None
        revision = 0
        while True:
            try:
                revision, _, _ = await operator.assign(digest, selector="env=bench")
                break
            except Exception:
                await asyncio.sleep(0.02)
        written = time.monotonic()

        def in_new_epoch(n: Any) -> bool:
            return n.agent is not None and n.agent.cursor.epoch not in ("", old_epoch)

        def caught_up_with(n: Any) -> bool:
            return in_new_epoch(n) and n.agent.cursor.revision >= revision

        first = await until(lambda: any(in_new_epoch(n) for n in nodes), 120, "an agent in the new epoch")
        caught_up = await until(lambda: all(caught_up_with(n) for n in nodes), 300, "every agent caught up")
        resets = sum(n.agent.counters.resets for n in nodes if n.agent is not None)
        return {
            "promoted_s": cluster.promoted_at - killed,
            "first_write_s": written - killed,
            "write_after_promotion_s": written - cluster.promoted_at,
            "first_agent_new_epoch_s": first - killed,
            "all_caught_up_s": caught_up - killed,
            "agent_resets": resets,
            "agent_cpu_s": procstat.cpu_seconds(os.getpid()) - cpu0,
        }
    finally:
        if sim is not None:
            await sim.stop()
        if operator is not None:
            await operator.close()
        server.stop()
        await cluster.close()


# -- takeover --------------------------------------------------------------------------------


async def lease_holder(url: str, name: str) -> str:
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
    try:
        return str(await conn.fetchval("SELECT holder FROM leases WHERE name = $1", name) or "")
    finally:
        await conn.close()


async def takeover_run(agents: int, work: Path) -> dict[str, Any]:
    await postgres.ensure_running()
    url = await postgres.create_database(durable=True)
    data = work / "data"
    a = ServerProcess(
        data, database_url=url, cpus=None, extra_args=("--replica-id", "a"), log_path=work / "a.log"
    )
    b = ServerProcess(
        data, database_url=url, cpus=None, extra_args=("--replica-id", "b"), log_path=work / "b.log"
    )
    sim: FleetSimulator | None = None
    operator: Operator | None = None
    try:
        await asyncio.to_thread(a.start)
        await asyncio.to_thread(b.start)
        operator = Operator(a.target, data)
        sim = fleet(b.target, server_token(data), agents, "take")
        await sim.start()
        await sim.wait_registered(within=300)
        digest = await operator.upload(bench_bundle("takeover"))
        stub = rollout_pb2_grpc.RolloutServiceStub(operator.channel)
        created = (
            await stub.CreateRollout(
                rpb.CreateRolloutRequest(
                    project="default",
                    bundle_digest=digest,
                    selector="env=bench",
                    strategy=rpb.STRATEGY_ALL_AT_ONCE,
                    gates=rpb.HealthGates(),
                    bake_time=_seconds(600),
                    progress_deadline=_seconds(1200),
                ),
                metadata=operator.metadata,
            )
        ).rollout
        lease = f"rollout:{created.id}"
        deadline = time.monotonic() + 60
        while not (await lease_holder(url, lease)).startswith("a/"):
            if time.monotonic() > deadline:
                raise TimeoutError("replica A never led the rollout")
            await asyncio.sleep(0.05)
        await operator.close()
        operator = None
        assert a.proc is not None
        killed = time.monotonic()
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait()
        while not (await lease_holder(url, lease)).startswith("b/"):
            if time.monotonic() - killed > 120:
                raise TimeoutError("replica B never took the rollout over")
            await asyncio.sleep(POLL)
        return {"takeover_s": time.monotonic() - killed}
    finally:
        if sim is not None:
            await sim.stop()
        if operator is not None:
            await operator.close()
        for server in (a, b):
            server.stop()
        await postgres.drop_database(url)


def _seconds(value: float) -> Any:
    from google.protobuf.duration_pb2 import Duration

    return Duration(seconds=int(value))


# -- restart -------------------------------------------------------------------------------


async def restart_run(agents: int, outage: float, kill: bool, work: Path) -> dict[str, Any]:
    port = free_port()
    server = ServerProcess(work / "data", cpus=None, extra_args=("--listen", f"127.0.0.1:{port}"))
    sim: FleetSimulator | None = None
    try:
        await asyncio.to_thread(server.start)
        sim = fleet(server.target, server_token(server.data_dir), agents, "rst")
        await sim.start()
        await sim.wait_registered(within=600)
        agents_of = {n.name: n.agent for n in sim.nodes if n.agent is not None}
        assert server.proc is not None
        if kill:
            server.proc.send_signal(signal.SIGKILL)
            server.proc.wait()
        else:
            await asyncio.to_thread(server.stop)
        await until(
            lambda: not any(a.connected.is_set() for a in agents_of.values()), 60, "every stream down"
        )
        await asyncio.sleep(outage)
        cpu0 = procstat.cpu_seconds(os.getpid())
        await asyncio.to_thread(server.start)
        serving = time.monotonic()
        back: dict[str, float] = {}
        deadline = serving + 300
        while len(back) < len(agents_of) and time.monotonic() < deadline:
            now = time.monotonic()
            for name, agent in agents_of.items():
                if name not in back and agent.connected.is_set():
                    back[name] = now - serving
            await asyncio.sleep(POLL)
        stats = quantiles(list(back.values()))
        return {
            **{f"back_{k}_s" if k != "n" else "back_n": v for k, v in stats.items()},
            "agents": len(agents_of),
            "agent_cpu_s": procstat.cpu_seconds(os.getpid()) - cpu0,
        }
    finally:
        if sim is not None:
            await sim.stop()
        server.stop()


# -- main ----------------------------------------------------------------------------------


def medians(runs: list[dict[str, Any]]) -> dict[str, float]:
    keys = [k for k, v in runs[0].items() if isinstance(v, int | float)]
    return {k: statistics.median(r[k] for r in runs) for k in keys}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    scenarios = ["promotion", "takeover", "restart"] if args.scenario == "all" else [args.scenario]
    report: dict[str, Any] = {"machine": machine(), "args": vars(args)}
    for scenario in scenarios:
        runs = []
        for i in range(args.runs):
            with tempfile.TemporaryDirectory(prefix=f"bench-failover-{scenario}-") as tmp:
                work = Path(tmp)
                if scenario == "promotion":
                    result = await promotion_run(args.promotion_agents, not args.async_replication, work)
                elif scenario == "takeover":
                    result = await takeover_run(args.takeover_agents, work)
                else:
                    result = await restart_run(args.agents, args.outage, args.kill, work)
            say(
                f"{scenario} run {i + 1}/{args.runs}: " + ", ".join(f"{k}={v:.3f}" for k, v in result.items())
            )
            runs.append(result)
        report[scenario] = {"runs": runs, "median": medians(runs)}
        say(f"{scenario} median: " + ", ".join(f"{k}={v:.3f}" for k, v in report[scenario]["median"].items()))
    return report


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.failover", description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", choices=["all", "promotion", "takeover", "restart"], default="all")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--agents", type=int, default=1000, help="agents of the restart scenario")
    p.add_argument("--promotion-agents", type=int, default=200)
    p.add_argument("--takeover-agents", type=int, default=20)
    p.add_argument("--outage", type=float, default=2.0, help="seconds the restarted server stays down")
    p.add_argument("--kill", action="store_true", help="restart after SIGKILL rather than SIGTERM")
    p.add_argument("--async", dest="async_replication", action="store_true", help="asynchronous standby")
    return p.parse_args(argv)


if __name__ == "__main__":
    arguments = parse()
    result = asyncio.run(main(arguments))
    path = write_json(f"failover-{time.strftime('%Y%m%d-%H%M%S')}.json", result)
    say(f"wrote {path}")
