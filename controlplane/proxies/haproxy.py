"""HAProxy: the main configuration the driver runs it from, its validator, its master CLI
and its statistics.

HAProxy reads several `-f` files as one configuration: the driver's own (a `global`
section with the stats socket, and a status frontend on loopback answering `/agent/bundle`
with the digest it was made for) and then the bundle's `haproxy.cfg`, unchanged. Both are
named relative to `-C <dir>`, the directory HAProxy changes to before it reads them, so
relative paths in a bundle (certificates, error files, maps) are relative to its
`haproxy.cfg`. The master re-executes itself with the same arguments on a reload, so
`-C <state>/current` follows the swapped link.

HAProxy 2.6's statistics give per-frontend request and 5xx counters but latency only as
averages over the last 1,024 requests (`ttime`), so the driver reports no p99 for HAProxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path

from controlplane.proxies.binaries import Binary
from controlplane.proxies.http import Address

MAIN = "haproxy.cfg"
AGENT_MAIN = ".agent-haproxy.cfg"
PID_FILE = "haproxy.pid"
MASTER_SOCKET = "master.sock"
STATS_SOCKET = "stats.sock"
STATUS_FRONTEND = "controlplane_agent"
BUNDLE_PATH = "/agent/bundle"
_SAFE_PATH = re.compile(r"[A-Za-z0-9/._+@-]+")


def _path(path: Path) -> str:
    if not _SAFE_PATH.fullmatch(str(path)):
        raise ValueError(f"{path} holds a character the driver does not put in HAProxy's configuration")
    return str(path)


def render_main(*, run_dir: Path, status: Address, digest: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9:._-]*", digest):
        raise ValueError("digest not usable in HAProxy's configuration")
    return f"""# Written by the control plane agent; the bundle's own files are read after it, unchanged.
global
    stats socket {_path(run_dir / STATS_SOCKET)} mode 600 level admin

frontend {STATUS_FRONTEND}
    mode http
    bind {status}
    timeout client 10s
    http-request return status 200 content-type text/plain string "{digest}" if {{ path {BUNDLE_PATH} }}
    http-request return status 404
"""


def validate_argv(binary: Binary, tree: Path, main: str = MAIN) -> list[str]:
    # Not -q: HAProxy 2.6 then says nothing at all about a configuration it refuses.
    return [str(binary.path), "-c", "-C", str(tree), "-f", AGENT_MAIN, "-f", main]


def run_argv(binary: Binary, current: Path, run_dir: Path, main: str = MAIN) -> list[str]:
    """Master-worker mode in the foreground, with the master CLI on a socket."""
    return [
        str(binary.path),
        "-W",
        "-S",
        _path(run_dir / MASTER_SOCKET),
        "-p",
        str(run_dir / PID_FILE),
        "-C",
        str(current),
        "-f",
        AGENT_MAIN,
        "-f",
        main,
    ]


class CliError(Exception):
    pass


async def cli(socket_path: Path, command: str, seconds: float = 2.0, limit: int = 4 * 1024 * 1024) -> str:
    """One command on a HAProxy CLI socket (the master's or a worker's stats socket)."""

    async def talk() -> bytes:
        reader, writer = await asyncio.open_unix_connection(str(socket_path))
        try:
            # `;quit`: the master CLI keeps a connection open after a command otherwise.
            writer.write(f"{command};quit\n".encode())
            await writer.drain()
            data = await reader.read(limit + 1)
            while data and len(data) <= limit:
                more = await reader.read(limit + 1 - len(data))
                if not more:
                    break
                data += more
            return data
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    try:
        data = await asyncio.wait_for(talk(), seconds)
    except TimeoutError:
        raise CliError(f"{socket_path}: no answer to {command!r} within {seconds:g}s") from None
    except OSError as e:
        raise CliError(f"{socket_path}: {e.strerror or e}") from None
    if len(data) > limit:
        raise CliError(f"{socket_path}: answer to {command!r} over {limit} bytes")
    return data.decode(errors="replace")


@dataclass(frozen=True)
class Processes:
    """The master CLI's `show proc`."""

    master_pid: int
    reloads: int
    failed_reloads: int
    # Current workers (not the old ones still finishing their connections).
    workers: tuple[int, ...]


def parse_show_proc(text: str) -> Processes:
    master = re.search(r"^(\d+)\s+master\s+(\d+)(?:\s+\[failed:\s*(\d+)\])?", text, re.M)
    if master is None:
        raise ValueError(f"not a `show proc` answer: {text[:120]!r}")
    workers: list[int] = []
    section = ""
    for line in text.splitlines():
        if line.startswith("#"):
            section = line.strip("# ").strip()
            continue
        match = re.match(r"^(\d+)\s+worker\b", line)
        if match and section == "workers":
            workers.append(int(match.group(1)))
    return Processes(int(master.group(1)), int(master.group(2)), int(master.group(3) or 0), tuple(workers))


@dataclass(frozen=True)
class FrontendTotals:
    requests: int
    errors: int


def parse_show_stat(text: str) -> FrontendTotals:
    """HTTP requests and 5xx responses of every frontend but the driver's own."""
    if not text.startswith("# "):
        raise ValueError(f"not a `show stat` answer: {text[:80]!r}")
    rows = csv.DictReader(io.StringIO(text[2:]))
    requests = errors = 0
    for row in rows:
        if row.get("svname") != "FRONTEND" or row.get("pxname") == STATUS_FRONTEND:
            continue
        requests += int(row.get("req_tot") or 0)
        errors += int(row.get("hrsp_5xx") or 0)
    return FrontendTotals(requests, errors)
