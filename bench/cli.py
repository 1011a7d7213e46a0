"""CLI benchmark: how long `controlplane` takes to start and to make one call, beside
grpcurl making the same call in the same run.

    python -m bench.cli --nodes 52 --runs 20

One `controlplane serve` (pinned to CPU 0) with N registered nodes; each command is run
`--runs` times as a fresh process (pinned to CPU 1), wall time from spawn to exit:

  help        controlplane --help
  nodes-list  controlplane nodes list (a table of the N nodes)
  nodes-json  controlplane nodes list -o json
  grpcurl     grpcurl ... controlplane.node.v1.NodeService/ListNodes (the same call)

Reports the median, p90 and min per command, the ratio of each call to grpcurl's, and
the load average before and after (the machine is shared).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc

from bench.common import CLIENT_CPU, OUT, ServerProcess, machine, pinned, write_json
from controlplane.api.node.v1 import node_pb2, node_pb2_grpc

BIN = Path(sys.executable).parent


async def register(target: str, token: str, nodes: int) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = node_pb2_grpc.NodeServiceStub(channel)
        for i in range(nodes):
            await stub.RegisterNode(
                node_pb2.RegisterNodeRequest(
                    project="default",
                    enrollment_token=token,
                    name=f"edge-{i:03d}",
                    labels={"env": "bench", "rack": f"r{i % 4}"},
                )
            )


def timed(cmd: list[str], env: dict[str, str], runs: int) -> dict[str, float]:
    walls = []
    for _ in range(runs):
        t0 = time.perf_counter()
        done = subprocess.run(pinned(cmd, CLIENT_CPU), env=env, capture_output=True, check=False)
        walls.append(time.perf_counter() - t0)
        if done.returncode != 0:
            raise RuntimeError(f"{cmd} exited {done.returncode}: {done.stderr.decode()[-2000:]}")
    walls.sort()
    return {
        "median_ms": round(statistics.median(walls) * 1000, 1),
        "p90_ms": round(walls[int(len(walls) * 0.9) - 1] * 1000, 1),
        "min_ms": round(walls[0] * 1000, 1),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    data_dir = OUT / "cli-data"
    shutil.rmtree(data_dir, ignore_errors=True)
    server = ServerProcess(data_dir, extra_args=["--log-level", "WARNING", "--rate-limit", "anonymous=0"])
    load_before = os.getloadavg()
    server.start()
    try:
        token = (data_dir / "enrollment-token").read_text().strip()
        asyncio.run(register(server.target, token, args.nodes))
        key = (data_dir / "admin-key").read_text().strip()
        env = {**os.environ, "CONTROLPLANE_SERVER": server.target, "CONTROLPLANE_API_KEY": key}
        grpcurl = shutil.which("grpcurl", path=str(BIN)) or "grpcurl"
        body = json.dumps({"project": "default", "page_size": 100})
        commands = {
            "help": [str(BIN / "controlplane"), "--help"],
            "nodes-list": [str(BIN / "controlplane"), "nodes", "list"],
            "nodes-json": [str(BIN / "controlplane"), "nodes", "list", "-o", "json"],
            "grpcurl": [
                grpcurl,
                "-plaintext",
                "-H",
                f"authorization: Bearer {key}",
                "-d",
                body,
                server.target,
                "controlplane.node.v1.NodeService/ListNodes",
            ],
        }
        for cmd in commands.values():  # warm the page cache and the server
            subprocess.run(cmd, env=env, capture_output=True, check=False)
        results = {name: timed(cmd, env, args.runs) for name, cmd in commands.items()}
    finally:
        server.stop()
    base = results["grpcurl"]["median_ms"]
    for name in ("nodes-list", "nodes-json"):
        results[name]["vs_grpcurl"] = round(results[name]["median_ms"] / base, 2)
    return {
        "nodes": args.nodes,
        "runs": args.runs,
        "results": results,
        "targets_ms": {"help": 250, "nodes-list": 400},
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "machine": machine(),
    }


def report(result: dict[str, Any]) -> str:
    lines = [
        f"{result['nodes']} nodes, {result['runs']} runs each; load {result['load_before']} -> "
        f"{result['load_after']}",
        f"{'command':12} {'median ms':>10} {'p90 ms':>8} {'min ms':>8} {'vs grpcurl':>11}",
    ]
    for name, r in result["results"].items():
        ratio = f"{r['vs_grpcurl']:.2f}x" if "vs_grpcurl" in r else ""
        lines.append(f"{name:12} {r['median_ms']:10.1f} {r['p90_ms']:8.1f} {r['min_ms']:8.1f} {ratio:>11}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    p.add_argument("--nodes", type=int, default=52)
    p.add_argument("--runs", type=int, default=20)
    args = p.parse_args()
    result = run(args)
    path = write_json(f"cli-{args.nodes}.json", result)
    print(report(result))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
