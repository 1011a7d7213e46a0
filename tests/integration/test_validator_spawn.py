"""Validators started from a process that serves gRPC under uvloop, as `controlplane
serve` does, run their program every time.

A fork of such a process runs gRPC's fork handlers in the child, which now and then
crash it before it runs anything (SIGSEGV; about 4 children in 100 here when uvloop's
libuv forked them): a validator "killed by signal 11" fails a good bundle, and a
validator that passes on a crash would pass a bad one. The process here serves a real
gRPC server on port 0, keeps calls in flight, and runs 200 programs each way the server
runs them (a proxy's validator, an admin's command)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = r"""
import asyncio, json, sys
from datetime import timedelta
from pathlib import Path

import grpc, uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from controlplane.domain.bundles.validators import CommandCheck, run_command
from controlplane.proxies.run import run


async def main() -> None:
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = health_pb2_grpc.HealthStub(channel)

    async def calls() -> None:
        while True:
            await stub.Check(health_pb2.HealthCheckRequest())

    busy = asyncio.create_task(calls())
    outcomes: dict[str, int] = {}
    check = CommandCheck("true", ("true",), timedelta(seconds=10))
    for _ in range(int(sys.argv[1])):
        proxy = (await run(["true"], seconds=10)).code
        command = await run_command(check, Path(sys.argv[2]), "", {"true"})
        for outcome in (f"proxy:{proxy}", f"command:{command.ok}:{command.output}"):
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    busy.cancel()
    await channel.close()
    await server.stop(None)
    print(json.dumps(outcomes))


uvloop.run(main())
"""


def test_no_validator_child_is_lost_to_a_fork_of_a_grpc_server(tmp_path: Path) -> None:
    runs = 200
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(runs), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"GRPC_VERBOSITY": "ERROR", "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    outcomes = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcomes == {"proxy:0": runs, "command:True:exit 0": runs}, outcomes
