"""The HAProxy driver.

Validate: `haproxy -c -C <new tree> -f .agent-haproxy.cfg -f haproxy.cfg`. Activate:
the master CLI's `reload` (the master re-executes itself with its arguments, and
`-C <state>/current` now leads to the new bundle); the driver confirms through the master
CLI's `show proc` (one more reload, none more failed) and the status frontend answering
the new digest. A master that runs (the pid file) but is slow to answer its CLI is
waited for, never started twice. A failed reload leaves the old worker serving; its
words come from the master's output (`<state>/proxy/haproxy.out`, or `--proxy-log` when
attached). Started by
the agent: `haproxy -W -S <state>/proxy/master.sock -p … -C <state>/current -f
.agent-haproxy.cfg -f haproxy.cfg`. Attached: the same command run by a service manager;
the agent talks to its master socket.

Metrics: requests and 5xx responses of every frontend but the driver's own, from the
stats socket's `show stat`. No p99: HAProxy 2.6 reports latency only as averages.

Router: a routing table's servers go into the named backend of the bundle through the
runtime API (`controlplane.proxies.haproxy_routes`); the last table applied is kept in
`<state>/proxy/routes.json` and applied again after every start or reload the driver
makes, since servers added at run time do not survive one.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from typing import Literal

from agent_stub.applier import ApplyRequest
from agent_stub.drivers.base import ProxyDriver, alive, cmdline, read_pid
from agent_stub.errors import ApplyFailed
from controlplane.api.node.v1 import node_pb2
from controlplane.proxies import haproxy, haproxy_routes, routes
from controlplane.proxies.check import DEFAULT_STATUS
from controlplane.proxies.haproxy import CliError
from controlplane.proxies.http import Address, HttpError
from controlplane.proxies.validate import bounded
from controlplane.proxies.window import delta, ratio


class HaproxyDriver(ProxyDriver):
    kind = "haproxy"
    default_status = DEFAULT_STATUS["haproxy"]

    def setup(self) -> None:
        sockets = haproxy.socket_dir(self.run_dir)
        self.master_socket = self.config.control or sockets / haproxy.MASTER_SOCKET
        self.stats_socket = sockets / haproxy.STATS_SOCKET
        self.words_path = self.config.log if self.attach else self.out_path
        self._last: tuple[float, haproxy.FrontendTotals] | None = None
        self.routes_path = self.run_dir / "routes.json"

    def main_text(self, digest: str) -> str:
        return haproxy.render_main(run_dir=self.run_dir, status=self.status, digest=digest)

    async def prepare(self, request: ApplyRequest) -> None:
        await self.check(request)

    def master(self) -> int | None:
        """The pid of the HAProxy master this agent started (this run or an earlier one),
        from the process or the pid file; None when none runs, or when attached (a service
        manager's HAProxy is known by its master socket only)."""
        self.reap()
        if self.proc is not None:
            return self.proc.pid
        if self.attach:
            return None
        pid = read_pid(self.run_dir / haproxy.PID_FILE)
        return pid if pid is not None and alive(pid) and "haproxy" in cmdline(pid) else None

    async def show_proc(self) -> haproxy.Processes | None:
        """The master's `show proc` once; None when it does not answer."""
        try:
            return haproxy.parse_show_proc(await haproxy.cli(self.master_socket, "show proc"))
        except (CliError, ValueError):
            return None

    async def processes(self) -> haproxy.Processes | None:
        """The master's `show proc`; None when no master runs. A master that runs but does
        not answer yet (a loaded machine) is waited for, up to the confirmation timeout:
        starting a second HAProxy beside it would serve the old bundle and the new one
        side by side."""

        async def answer() -> haproxy.Processes | Literal[False] | None:
            found = await self.show_proc()
            if found is None and self.master() is None:
                return False
            return found

        found = await self.until(answer, f"answer on its master socket {self.master_socket}")
        return found if isinstance(found, haproxy.Processes) else None

    def _words(self, mark: int) -> str:
        if self.words_path is None:
            return "(its messages went to its service manager's log; --proxy-log names a file to quote)"
        return self.output_since(mark, self.words_path)

    async def activate(self, request: ApplyRequest) -> None:
        digest = request.target.digest
        self.write_reserved(request.bundle_dir.absolute(), haproxy.AGENT_MAIN, self.main_text(digest))
        before = await self.processes()
        if before is None:
            await self._start(digest)
            return
        mark = self.output_mark(self.words_path) if self.words_path else 0
        try:
            await haproxy.cli(self.master_socket, "reload")
        except CliError as e:
            raise ApplyFailed(f"haproxy's master did not take the reload: {e}") from None
        self.log.info("proxy.reload", proxy=self.kind, pid=before.master_pid, digest=digest)

        async def loaded() -> bool | None:
            now = await self.show_proc()  # None while the master re-executes itself
            if now is None or now.reloads <= before.reloads:
                return None
            if now.failed_reloads > before.failed_reloads:
                raise ApplyFailed(bounded(f"haproxy did not load the bundle: {self._words(mark)}"))
            return await self._serving(digest)

        await self.until(loaded, f"load {digest}")
        await self._reroute()

    async def _start(self, digest: str) -> None:
        await self._start_proxy(digest)
        await self._reroute()

    async def _start_proxy(self, digest: str) -> None:
        if self.attach:
            await self.until(lambda: self._serving(digest), f"start serving {digest} (attached: no master)")
            return
        mark = self.output_mark()
        self.proc = self.spawn(haproxy.run_argv(self.binary, self.current, self.run_dir))
        proc = self.proc

        async def started() -> bool | None:
            if proc.poll() is not None:
                self.proc = None
                raise ApplyFailed(
                    bounded(f"haproxy exited with code {proc.returncode} at start: {self.output_since(mark)}")
                )
            return await self._serving(digest)

        await self.until(started, f"start serving {digest}")

    async def _serving(self, digest: str) -> bool | None:
        served = await self.served_or_none(haproxy.BUNDLE_PATH)
        return True if served == digest else None

    async def stop(self) -> None:
        pid = self.master()
        if pid is not None:
            os.kill(pid, signal.SIGUSR1)  # soft stop: finish connections, exit
            self.log.info("proxy.stopped", proxy=self.kind, pid=pid)

    async def reconcile(self, request: ApplyRequest) -> None:
        digest = request.target.digest
        procs = await self.processes()
        if procs is None and self.attach:
            self.log.warning("reconcile.proxy_down", proxy=self.kind, socket=str(self.master_socket))
            return
        if procs is not None and await self._serving(digest):
            self.log.info("reconcile.serving", proxy=self.kind, pid=procs.master_pid, digest=digest)
            await self._reroute()
            return
        self.log.warning("reconcile.reload", proxy=self.kind, digest=digest)
        await self.activate(request)

    async def metrics(self, digest: str) -> node_pb2.NodeMetrics | None:
        if not digest:
            return None
        try:
            served = await self.served(haproxy.BUNDLE_PATH)
            totals = haproxy.parse_show_stat(await haproxy.cli(self.stats_socket, "show stat"))
        except (HttpError, CliError, ValueError):
            self._last = None
            return self.health(node_pb2.HEALTH_STATUS_UNHEALTHY)
        now = time.monotonic()
        out = self.health(
            node_pb2.HEALTH_STATUS_HEALTHY if served == digest else node_pb2.HEALTH_STATUS_UNHEALTHY
        )
        if self._last is not None:
            at, before = self._last
            requests = delta(before.requests, totals.requests)
            out.requests_per_second = requests / max(now - at, 1e-3)
            out.error_rate = ratio(delta(before.errors, totals.errors), requests)
        self._last = (now, totals)
        return out

    # -- a router's servers ---------------------------------------------------------------

    def _applied_table(self) -> routes.Table | None:
        try:
            return routes.Table.from_json(json.loads(self.routes_path.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
            self.log.warning("router.state_unreadable", path=str(self.routes_path), error=str(e))
            return None

    async def route(self, table: routes.Table | None) -> None:
        """Make the router's backend hold `table`'s servers at their weights (None:
        remove the servers this driver added), then confirm HAProxy runs them."""
        before = self._applied_table()
        if table is not None:
            table = await self._resolved(table)
        if before is not None and (table is None or before.backend != table.backend):
            # Withdrawn, or moved to another backend section: empty the old one.
            await self._apply(routes.Table(before.revision, before.backend, {}))
        if table is not None:
            await self._apply(table)
        self._save(table)
        self.log.info(
            "router.applied",
            revision=table.revision if table else None,
            backend=table.backend if table else None,
            servers=len(table.servers) if table else 0,
        )

    async def _reroute(self) -> None:
        """After a start or reload: the new worker has only its configuration's servers."""
        table = self._applied_table()
        if table is not None:
            await self._apply(table)
            self.log.info("router.reapplied", revision=table.revision, servers=len(table.servers))

    def _save(self, table: routes.Table | None) -> None:
        try:
            if table is None:
                self.routes_path.unlink(missing_ok=True)
                return
            temp = self.routes_path.with_suffix(".tmp")
            temp.write_text(json.dumps(table.to_json()))
            temp.replace(self.routes_path)
        except OSError as e:
            raise ApplyFailed(
                f"keeping the routing table in {self.routes_path} failed on this node: {e}"
            ) from None

    async def _resolved(self, table: routes.Table) -> routes.Table:
        """HAProxy 2.6 needs resolvers for a server named by host name: the driver looks
        names up once, here, and gives it the first address."""
        loop = asyncio.get_running_loop()
        servers = dict(table.servers)
        for name, server in table.servers.items():
            host = server.address.host
            if _is_ip(host):
                continue
            try:
                found = await loop.getaddrinfo(host, server.address.port, type=socket.SOCK_STREAM)
            except OSError as e:
                raise ApplyFailed(
                    f"backend {name} at {server.address}: {host} does not resolve: {e}"
                ) from None
            ip = str(found[0][4][0])
            servers[name] = routes.Server(name, Address(ip, server.address.port), server.weight)
        return routes.Table(table.revision, table.backend, servers)

    async def _state(self, backend: str) -> tuple[dict[str, routes.Server], set[str]]:
        try:
            answer = await haproxy.cli(self.stats_socket, f"show servers state {backend}")
            return haproxy_routes.parse_servers_state(answer, backend)
        except haproxy_routes.NoBackend:
            raise ApplyFailed(
                f"haproxy has no backend {backend!r}: the router's configuration must declare "
                f"`backend {backend}` (balance roundrobin) for the servers the control plane routes to"
            ) from None
        except (CliError, ValueError) as e:
            raise ApplyFailed(f"haproxy's runtime API did not answer: {e}") from None

    async def _apply(self, table: routes.Table) -> None:
        running, maint = await self._state(table.backend)
        changes = routes.diff(running, table.servers)
        for command in haproxy_routes.commands(table.backend, changes, maint, table.servers):
            await self._command(command)
        after, maint = await self._state(table.backend)
        wrong = [name for name, want in table.servers.items() if after.get(name) != want or name in maint]
        if wrong:
            raise ApplyFailed(
                f"haproxy does not run the routing table's servers as sent: {', '.join(wrong[:5])}"
            )

    async def _command(self, command: str) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                answer = await haproxy.cli(self.stats_socket, command)
            except CliError as e:
                raise ApplyFailed(f"haproxy's runtime API did not answer {command!r}: {e}") from None
            refused = haproxy_routes.refusal(command, answer)
            if refused is None:
                return
            # A deleted server's connections close asynchronously: `del server` waits for them.
            if command.startswith("del server") and "connection" in refused and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                continue
            raise ApplyFailed(bounded(f"haproxy refused `{command}`: {refused}"))


def _is_ip(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:
        return False
    return True
