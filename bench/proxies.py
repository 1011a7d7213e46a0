"""Proxy drivers benchmark: how fast a change reaches real proxies, what the agent costs.

    python -m bench.proxies --proxy nginx --nodes 3 --changes 100

For each proxy named (`--proxy` repeats; default all three): one `controlplane serve`
(pinned to CPU 0) and `--nodes` agent processes, each driving its own proxy. Every bundle
answers `/` directly with its change number (no upstream to measure), on one port all the
nodes share (SO_REUSEPORT); each node is asked what it serves on its own status endpoint
(nginx, HAProxy: the driver's status server, part of the same configuration; Envoy: the
admin API of the process serving it).

  change time   AssignBundle returning -> every node answering with the new bundle
                (polled every `--poll` seconds per node), p50/p99/max over `--changes`
  reload share  per node and change, from the agent's log: the proxy told to load the
                bundle (`proxy.reload` / `proxy.hot_restart`) -> the driver confirming it
                (`apply.active`), i.e. the proxy's own reload plus the confirmation,
                against the node's whole change time
  idle agent    CPU and RSS of each agent over `--idle-seconds` with no change and no
                traffic (its heartbeats read the proxy's statistics every
                `--heartbeat-interval`)
  stats read    CPU of one heartbeat's reading of the proxy's statistics (the driver's
                `metrics()`, in this process, against node 0's proxy) while a load
                generator (another process) sends `--rate` requests a second per node
                to the shared port; the rate node 0's proxy reported is recorded too

The numbers go to `.bench-out/proxies.json` and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent_stub.config import ProxyConfig
from agent_stub.drivers import DRIVERS
from agent_stub.logs import EventLog
from bench import procstat
from bench.common import (
    CLIENT_CPU,
    Operator,
    ServerProcess,
    bundle_archive,
    free_port,
    machine,
    pinned,
    quantiles,
    write_json,
)
from controlplane.proxies import KINDS, ProxyKind, envoy, haproxy, nginx
from controlplane.proxies.binaries import locate
from controlplane.proxies.http import Address, HttpError, get


def say(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


# -- bundles that answer directly -----------------------------------------------------


def files(kind: ProxyKind, port: int, tag: str) -> dict[str, bytes]:
    if kind == "nginx":
        conf = f'server {{ listen 127.0.0.1:{port} reuseport; location / {{ return 200 "{tag}"; }} }}\n'
        return {nginx.MAIN: conf.encode()}
    if kind == "haproxy":
        conf = (
            "defaults\n    mode http\n    timeout client 10s\n\n"
            f"frontend web\n    bind 127.0.0.1:{port}\n"
            f'    http-request return status 200 content-type text/plain string "{tag}"\n'
        )
        return {haproxy.MAIN: conf.encode()}
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
        "HttpConnectionManager",
        "stat_prefix": "web",
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
        ],
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"prefix": "/"},
                            "direct_response": {"status": 200, "body": {"inline_string": tag}},
                        }
                    ],
                }
            ]
        },
    }
    listener = {
        "name": "web",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
        ],
    }
    return {envoy.MAIN: json.dumps({"static_resources": {"listeners": [listener]}}).encode()}


# -- the agents -------------------------------------------------------------------------


class Node:
    def __init__(self, kind: ProxyKind, root: Path, index: int, server: ServerProcess, heartbeat: float):
        self.kind = kind
        self.state = root / f"node-{index}"
        self.status = free_port()
        self.log_path = root / f"agent-{index}.log"
        token = (server.data_dir / "enrollment-token").read_text().strip()
        args = [
            sys.executable,
            "-m",
            "agent_stub",
            "--server",
            server.target,
            "--project",
            "default",
            "--token",
            token,
            "--trusted-keys",
            str(server.data_dir / "trusted-keys.json"),
            "--labels",
            f"bench={kind}",
            "--name",
            f"{kind}-{index}",
            "--state-dir",
            str(self.state),
            "--proxy",
            kind,
            "--proxy-status",
            f"127.0.0.1:{self.status}",
            "--heartbeat-interval",
            str(heartbeat),
            "--drain-seconds",
            "2",
        ]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(pinned(args, CLIENT_CPU), stdout=log, stderr=subprocess.STDOUT)

    async def served(self) -> str:
        path = "/server_info" if self.kind == "envoy" else nginx.BUNDLE_PATH
        try:
            response = await get(Address("127.0.0.1", self.status), path, seconds=2.0)
        except HttpError:
            return ""
        if response.status != 200:
            return ""
        return envoy.served_digest(response.text)[0] if self.kind == "envoy" else response.text.strip()

    def registered(self) -> bool:
        return (self.state / "identity.json").exists()

    def phases(self, digest: str) -> tuple[float, float] | None:
        """(proxy told, apply.active) wall times from the agent's log for `digest`."""
        told = active = None
        for line in self.log_path.read_text(errors="replace").splitlines():
            if f"digest={digest}" not in line:
                continue
            if " proxy.reload " in line or " proxy.hot_restart " in line:
                told = _log_time(line)
            elif " apply.active " in line:
                active = _log_time(line)
        return (told, active) if told is not None and active is not None else None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(15)
        if self.proc.poll() is None:
            self.proc.kill()
        stop_proxies_under(self.state)


def _log_time(line: str) -> float | None:
    """The time a line of the agent's log begins with: structlog's ISO 8601 in UTC
    (`2026-12-07T14:59:03.896511Z`)."""
    match = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?)Z", line)
    if match is None:
        return None
    return datetime.fromisoformat(match.group(1)).replace(tzinfo=UTC).timestamp()


def stop_proxies_under(state: Path) -> None:
    """The proxies a node's agent started (their command lines name its state dir, or they
    hold files under it), and what runs under them: SIGTERM, then SIGKILL, by pid."""
    root = str(state.absolute())
    table: dict[int, int] = {}
    found: set[int] = set()
    with os.scandir("/proc") as entries:
        pids = [int(e.name) for e in entries if e.name.isdigit()]
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            with os.scandir(f"/proc/{pid}/fd") as fds:
                links = [os.readlink(f.path) for f in fds]
        except OSError:
            continue
        table[pid] = int(stat[stat.rfind(")") + 2 :].split()[1])
        if "agent_stub" not in cmd and (root in cmd or any(link.startswith(root) for link in links)):
            found.add(pid)
    grew = True
    while grew:
        more = {pid for pid, ppid in table.items() if ppid in found} - found
        found |= more
        grew = bool(more)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in found:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        if sig == signal.SIGTERM:
            time.sleep(2)


# -- load --------------------------------------------------------------------------------


async def load(port: int, rate: float, seconds: float, connections: int = 8) -> None:
    """`rate` requests a second over keep-alive connections, for `seconds`."""
    deadline = time.monotonic() + seconds
    request = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
    per = rate / connections

    async def one() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        start, sent = time.monotonic(), 0
        while time.monotonic() < deadline:
            try:
                writer.write(request)
                await writer.drain()
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))  # type: ignore[union-attr]
                await reader.readexactly(length)
            except (asyncio.IncompleteReadError, ConnectionError):
                # The proxy ends a keep-alive connection after so many requests (nginx:
                # keepalive_requests, 1,000): open another, as a client would.
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                continue
            sent += 1
            await asyncio.sleep(max(0.0, start + sent / per - time.monotonic()))
        writer.close()

    await asyncio.gather(*(one() for _ in range(connections)))


# -- one proxy --------------------------------------------------------------------------


async def bench_proxy(kind: ProxyKind, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    binary = locate(kind)
    server = ServerProcess(root / "server", extra_args=("--heartbeat-interval", str(args.heartbeat_interval)))
    server.start()
    operator = Operator(server.target, server.data_dir)
    port = free_port()
    nodes: list[Node] = []
    try:
        nodes = [Node(kind, root, i, server, args.heartbeat_interval) for i in range(args.nodes)]
        deadline = time.monotonic() + 60
        while not all(n.registered() for n in nodes):
            if time.monotonic() > deadline:
                raise TimeoutError(f"agents did not register; see {root}")
            await asyncio.sleep(0.1)

        changes: list[float] = []
        # Per change: its digest, when AssignBundle returned, when each node served it.
        timeline: list[tuple[str, float, dict[int, float]]] = []
        for i in range(args.changes + 1):  # change 0 starts the proxies: not measured
            digest = await operator.upload(bundle_archive(files(kind, port, f"change-{i}")))
            _, _, assigned = await operator.assign(digest, selector=f"bench={kind}")
            seen: dict[int, float] = {}
            limit = time.monotonic() + 60
            while len(seen) < len(nodes):
                if time.monotonic() > limit:
                    raise TimeoutError(f"change {i} not served by every node within 60 s")
                for j, node in enumerate(nodes):
                    if j not in seen and await node.served() == digest:
                        seen[j] = time.time()
                await asyncio.sleep(args.poll)
            if i == 0:
                continue
            changes.append(max(seen.values()) - assigned)
            timeline.append((digest, assigned, seen))
        say(f"{kind}: {args.changes} changes, change time {quantiles(changes)}")

        # Idle agents: heartbeats only.
        before = {n.proc.pid: procstat.cpu_seconds(n.proc.pid) for n in nodes}
        await asyncio.sleep(args.idle_seconds)
        # Read now: an agent logs its confirmation after the bench may have seen the
        # new bundle answer.
        shares: list[float] = []
        reloads: list[float] = []
        for digest, assigned, seen in timeline:
            for j, node in enumerate(nodes):
                phases = node.phases(digest)
                if phases is not None:
                    told, active = phases
                    reloads.append(active - told)
                    shares.append((active - told) / max(seen[j] - assigned, 1e-3))
        idle_cpu = [
            (procstat.cpu_seconds(pid) - cpu) / args.idle_seconds * 100 for pid, cpu in before.items()
        ]
        rss = [procstat.rss_bytes(n.proc.pid) / 2**20 for n in nodes]

        # One heartbeat's statistics read under load, by the same driver in this process.
        node = nodes[0]
        config = ProxyConfig(kind=kind, status=f"127.0.0.1:{node.status}")
        driver = DRIVERS[kind](binary, config, node.state, EventLog(logging.getLogger("bench")))
        current = (node.state / "current").resolve().name
        applied = f"sha256:{current}"
        loader = await asyncio.create_subprocess_exec(
            *pinned(
                [
                    sys.executable,
                    "-m",
                    "bench.proxies",
                    "load",
                    "--port",
                    str(port),
                    "--rate",
                    # The port is shared: each node's proxy gets its share of the load.
                    str(args.rate * len(nodes)),
                    "--seconds",
                    str(args.stats_seconds + 2),
                ],
                CLIENT_CPU,
            )
        )
        reads: list[float] = []
        reported: list[float] = []
        try:
            await driver.metrics(applied)  # the first reading sets the baseline
            end = time.monotonic() + args.stats_seconds
            while time.monotonic() < end:
                await asyncio.sleep(args.read_every)
                cpu = time.process_time()
                metrics = await driver.metrics(applied)
                reads.append((time.process_time() - cpu) * 1000)
                if metrics is not None and metrics.HasField("requests_per_second"):
                    reported.append(metrics.requests_per_second)
        finally:
            await asyncio.wait_for(loader.wait(), 30)
            await driver.close()
        return {
            "proxy": f"{kind} {binary.version}",
            "nodes": args.nodes,
            "changes": args.changes,
            "change_seconds": quantiles(changes),
            "reload_seconds": quantiles(reloads),
            "reload_share": quantiles(shares),
            "idle_agent_cpu_percent": quantiles(idle_cpu),
            "agent_rss_mib": quantiles(rss),
            "stats_read_cpu_ms": quantiles(reads),
            "stats_read_every_seconds": args.read_every,
            "load_rate_target": args.rate,
            "load_rate_reported": quantiles(reported),
        }
    finally:
        for n in nodes:
            n.stop()
        await operator.close()
        server.stop()


async def main_async(args: argparse.Namespace) -> None:
    results: dict[str, Any] = {"machine": machine(), "args": vars(args), "proxies": {}}
    for kind in args.proxy or KINDS:
        with tempfile.TemporaryDirectory(prefix=f"bench-{kind}-") as tmp:
            say(f"{kind}: {args.nodes} node(s), {args.changes} change(s)")
            results["proxies"][kind] = await bench_proxy(kind, args, Path(tmp))
            print(json.dumps(results["proxies"][kind], indent=2))
    path = write_json("proxies.json", results)
    say(f"wrote {path}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "load":
        p = argparse.ArgumentParser(prog="bench.proxies load")
        p.add_argument("load")
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--rate", type=float, required=True)
        p.add_argument("--seconds", type=float, required=True)
        a = p.parse_args()
        asyncio.run(load(a.port, a.rate, a.seconds))
        return
    p = argparse.ArgumentParser(prog="bench.proxies", description=__doc__.split("\n\n")[0])
    p.add_argument("--proxy", action="append", choices=KINDS, help="repeat; default: all three")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--changes", type=int, default=100)
    p.add_argument("--poll", type=float, default=0.01, help="seconds between a node's probes")
    p.add_argument("--heartbeat-interval", type=float, default=10.0)
    p.add_argument("--idle-seconds", type=float, default=60.0)
    p.add_argument(
        "--rate", type=float, default=1000.0, help="requests a second per node during the stats reads"
    )
    p.add_argument("--stats-seconds", type=float, default=60.0)
    p.add_argument("--read-every", type=float, default=10.0, help="seconds between stats reads (a heartbeat)")
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
