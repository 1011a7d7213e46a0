"""Rollout benchmark: a rolling rollout to N simulated nodes in P % batches, zero bake.

    python -m bench.rollouts --nodes 1000 --batch-percent 10

One `controlplane serve` process (pinned to CPU 0) and, in this process (pinned to CPU
1), a fleet of N simulated nodes: each the real agent over real gRPC, applying by
downloading the archive, checking its digest and waiting `--apply-delay`. A warm-up
rollout puts every node on v1; the measured rollout moves them to v2 with no health
gates and no bake, so every second of a step is either the agents or the control plane.

Per step, from the server's step timestamps and the agents' own clocks (same machine):

  step time     the next step's write minus this step's write (the last: its end)
  agent time    the slowest node's apply: DesiredState received -> apply finished
  overhead      step time - agent time: everything not spent waiting on agents —
                the write, the fan-out to the streams, the ACTIVE reports, the driver
                noticing them (its tick), deciding and writing the next step
  deliver       step write -> the first / the last node receiving its DesiredState
  notice        the last node's apply finished -> the step marked done

Server CPU is utime+stime of the server process over the measured rollout.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time
from datetime import UTC
from pathlib import Path
from typing import Any

from google.protobuf.duration_pb2 import Duration

from agent_stub.backoff import BackoffPolicy
from agent_stub.simulator import FleetConfig, FleetSimulator
from bench import procstat
from bench.common import CLIENT_CPU, OUT, Operator, ServerProcess, bench_bundle, machine, pin_self, write_json
from controlplane.api.rollout.v1 import rollout_pb2 as pb
from controlplane.api.rollout.v1 import rollout_pb2_grpc


def say(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


def _zero() -> Duration:
    return Duration(seconds=0)


async def _rollout(
    stub: rollout_pb2_grpc.RolloutServiceStub, metadata: Any, digest: str, batch_percent: int
) -> tuple[pb.Rollout, float, float]:
    request = pb.CreateRolloutRequest(
        project="default",
        bundle_digest=digest,
        selector="env=bench",
        strategy=pb.STRATEGY_ROLLING,
        rolling=pb.RollingParams(batch_percent=batch_percent),
        gates=pb.HealthGates(),
        bake_time=_zero(),
        progress_deadline=Duration(seconds=600),
    )
    t0 = time.time()
    created = (await stub.CreateRollout(request, metadata=metadata)).rollout
    state = created.state
    async for message in stub.WatchRollout(
        pb.WatchRolloutRequest(project="default", rollout_id=created.id), metadata=metadata
    ):
        state = message.state
        if state in (pb.ROLLOUT_STATE_SUCCEEDED, pb.ROLLOUT_STATE_ROLLED_BACK, pb.ROLLOUT_STATE_CANCELLED):
            break
    t1 = time.time()
    done = (
        await stub.GetRollout(
            pb.GetRolloutRequest(project="default", rollout_id=created.id), metadata=metadata
        )
    ).rollout
    if done.state != pb.ROLLOUT_STATE_SUCCEEDED:
        raise RuntimeError(f"rollout ended {pb.RolloutState.Name(done.state)}: {done.reason}")
    return done, t0, t1


def _ts(value: Any) -> float:
    return float(value.ToDatetime(tzinfo=UTC).timestamp())


async def _nodes_by_step(
    stub: rollout_pb2_grpc.RolloutServiceStub, metadata: Any, rollout_id: str
) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    token = ""
    while True:
        reply = await stub.ListRolloutNodes(
            pb.ListRolloutNodesRequest(
                project="default", rollout_id=rollout_id, page_size=1000, page_token=token
            ),
            metadata=metadata,
        )
        for node in reply.nodes:
            out.setdefault(node.step, []).append(node.node_id)
        token = reply.next_page_token
        if not token:
            return out


def analyse(
    done: pb.Rollout, by_step: dict[int, list[str]], sim: FleetSimulator, digest: str
) -> list[dict[str, float]]:
    steps = list(done.steps)
    rows = []
    for i, step in enumerate(steps):
        start = _ts(step.started_at)
        end = _ts(steps[i + 1].started_at) if i + 1 < len(steps) else _ts(step.finished_at)
        timings = [
            sim.by_node_id(n).timings[digest] for n in by_step[i] if digest in sim.by_node_id(n).timings
        ]
        received = [r for r, _ in timings]
        applied = [a for _, a in timings]
        agent = max(a - r for r, a in timings)
        rows.append(
            {
                "step": i,
                "nodes": len(by_step[i]),
                "step_s": end - start,
                "agent_s": agent,
                "overhead_s": (end - start) - agent,
                "deliver_first_s": min(received) - start,
                "deliver_last_s": max(received) - start,
                "notice_s": _ts(step.finished_at) - max(applied),
            }
        )
    return rows


async def run(args: argparse.Namespace) -> dict[str, Any]:
    data_dir = Path(args.data_dir) if args.data_dir else OUT / "rollouts-data"
    if data_dir.exists() and not args.data_dir:
        import shutil

        shutil.rmtree(data_dir)
    server = ServerProcess(
        data_dir,
        database_url=args.database_url,
        extra_args=[
            "--heartbeat-interval",
            str(args.heartbeat_interval),
            "--rollout-tick",
            str(args.rollout_tick),
            "--offline-after",
            str(3 * args.heartbeat_interval),
            "--log-level",
            "WARNING",
            # The whole simulated fleet registers from one address: the per-address limit
            # on calls without a credential would meter its enrollment, not the rollout.
            "--rate-limit",
            "anonymous=0",
            *args.server_arg,
        ],
    )
    if args.notify_url:
        # Issue 13's features under load: every event of the rollouts to a receiver.
        server.extra_args = [*server.extra_args, "--outbound-allow", "127.0.0.0/8"]
    load_before = os.getloadavg()
    server.start()
    pin_self(CLIENT_CPU)
    operator = Operator(server.target, data_dir)
    stub = rollout_pb2_grpc.RolloutServiceStub(operator.channel)
    token = (data_dir / "enrollment-token").read_text().strip()
    sim = FleetSimulator(
        FleetConfig(
            server=server.target,
            project="default",
            token=token,
            nodes=args.nodes,
            labels={"env": "bench"},
            apply_delay=args.apply_delay,
            heartbeat_interval=args.heartbeat_interval,
            backoff=BackoffPolicy(base=0.5, cap=5.0),
            ramp=args.ramp,
            rpc_timeout=60.0,
            seed=1,
        )
    )
    try:
        t = time.time()
        say(f"starting {args.nodes} simulated nodes")
        await sim.start()
        await sim.wait_registered(300)
        registered_s = time.time() - t
        say(f"all connected after {registered_s:.1f} s")
        if args.notify_url:
            await _channel(operator, args.notify_url)
        v1 = await operator.upload(bench_bundle("v1"))
        v2 = await operator.upload(bench_bundle("v2"))
        await _rollout(stub, operator.metadata, v1, 100)  # warm-up: everyone on v1
        say("warm-up rollout done; measuring")
        profiler = _profile(args.py_spy, server.pid) if args.py_spy else None
        cpu0 = procstat.cpu_seconds(server.pid)
        done, t0, t1 = await _rollout(stub, operator.metadata, v2, args.batch_percent)
        cpu1 = procstat.cpu_seconds(server.pid)
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)
            profiler.wait(30)
        by_step = await _nodes_by_step(stub, operator.metadata, done.id)
        rows = analyse(done, by_step, sim, v2)
        metrics = server.metrics()
        say(f"measured rollout done in {t1 - t0:.2f} s; stopping")
    finally:
        try:
            await asyncio.wait_for(sim.stop(), 60)
        except TimeoutError:
            say("the simulated fleet did not stop within 60 s")
        await operator.close()
        server.stop()
    total = t1 - t0
    overheads = [r["overhead_s"] for r in rows]
    result = {
        "machine": machine(),
        # Other work on the VM (the tree and the machine are shared) skews every timing.
        "loadavg_before": load_before,
        "params": vars(args),
        "registered_s": registered_s,
        "total_s": total,
        "steps": len(rows),
        "step_s_median": statistics.median(r["step_s"] for r in rows),
        "overhead_s_median": statistics.median(overheads),
        "overhead_s_max": max(overheads),
        "overhead_s_sum": sum(overheads),
        "deliver_last_s_median": statistics.median(r["deliver_last_s"] for r in rows),
        "notice_s_median": statistics.median(r["notice_s"] for r in rows),
        "server_cpu_s": cpu1 - cpu0,
        "server_cpu_percent": 100 * (cpu1 - cpu0) / total,
        "driver_passes": metrics.get("controlplane_rollouts_driver_pass_seconds_count", 0.0),
        "driver_pass_s_sum": metrics.get("controlplane_rollouts_driver_pass_seconds_sum", 0.0),
        "per_step": rows,
    }
    return result


async def _channel(operator: Operator, url: str) -> None:
    """A webhook channel for every event kind: nothing grouped, nothing rate-limited."""
    from controlplane.api.notification.v1 import notification_pb2 as npb
    from controlplane.api.notification.v1 import notification_pb2_grpc

    stub = notification_pb2_grpc.NotificationServiceStub(operator.channel)
    spec = npb.ChannelSpec(
        name="bench", kind=npb.CHANNEL_KIND_WEBHOOK, url=url, secret="bench", rate_per_minute=600
    )
    spec.group_window.CopyFrom(_zero())
    await stub.CreateChannel(
        npb.CreateChannelRequest(project="default", channel=spec), metadata=operator.metadata
    )


def _profile(py_spy: str, pid: int) -> subprocess.Popen[bytes]:
    """Sample the server with py-spy (collapsed stacks) during the measured rollout;
    `python -m bench.profsum .bench-out/profile-rollouts.txt` summarises it."""
    cmd = [py_spy, "record", "--pid", str(pid), "--rate", "200", "--nonblocking", "--format", "raw"]
    cmd += ["--threads", "--output", str(OUT / "profile-rollouts.txt")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    return proc


def report(r: dict[str, Any]) -> str:
    lines = [
        f"rolling rollout to {r['params']['nodes']} nodes in {r['params']['batch_percent']} % batches, "
        f"bake 0, apply delay {r['params']['apply_delay']} s, driver tick {r['params']['rollout_tick']} s",
        f"  total {r['total_s']:.2f} s over {r['steps']} steps (median step {r['step_s_median']:.3f} s)",
        f"  control-plane overhead per step: median {r['overhead_s_median'] * 1000:.0f} ms, "
        f"max {r['overhead_s_max'] * 1000:.0f} ms, sum {r['overhead_s_sum']:.2f} s",
        f"  write -> last node told: median {r['deliver_last_s_median'] * 1000:.0f} ms; "
        f"last apply -> step done: median {r['notice_s_median'] * 1000:.0f} ms",
        f"  load average before the run {r['loadavg_before'][0]:.2f}; server CPU {r['server_cpu_s']:.2f} s "
        f"({r['server_cpu_percent']:.0f} % of one core while rolling out)",
        "  step  nodes   step_s  agent_s  overhead_s  deliver_last_s  notice_s",
    ]
    for row in r["per_step"]:
        lines.append(
            f"  {row['step']:4d} {row['nodes']:6d} {row['step_s']:8.3f} {row['agent_s']:8.3f} "
            f"{row['overhead_s']:11.3f} {row['deliver_last_s']:15.3f} {row['notice_s']:9.3f}"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--batch-percent", type=int, default=10)
    p.add_argument("--apply-delay", type=float, default=0.0, help="seconds per simulated apply")
    p.add_argument("--heartbeat-interval", type=float, default=10.0)
    p.add_argument("--rollout-tick", type=float, default=0.5, help="the driver's safety-net period")
    p.add_argument("--py-spy", default="", help="py-spy binary: sample the server during the rollout")
    p.add_argument("--ramp", type=float, default=100.0, help="simulated nodes started per second")
    p.add_argument("--database-url", default="", help="PostgreSQL URL (default: SQLite)")
    p.add_argument("--data-dir", default="", help="default: .bench-out/rollouts-data, made fresh")
    p.add_argument("--server-arg", action="append", default=[], help="extra `serve` argument")
    p.add_argument("--tag", default="", help="suffix for the result file name")
    p.add_argument("--notify-url", default="", help="send every notification event to this receiver")
    args = p.parse_args()
    result = asyncio.run(run(args))
    tag = f"-{args.tag}" if args.tag else ""
    name = (
        f"rollouts-{args.nodes}-{args.batch_percent}pct-{'pg' if args.database_url else 'sqlite'}{tag}.json"
    )
    path = write_json(name, result)
    print(report(result))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
