"""The HAProxy driver.

Validate: `haproxy -c -C <new tree> -f .agent-haproxy.cfg -f haproxy.cfg`. Activate:
the master CLI's `reload` (the master re-executes itself with its arguments, and
`-C <state>/current` now leads to the new bundle); the driver confirms through the master
CLI's `show proc` (one more reload, none more failed) and the status frontend answering
the new digest. A failed reload leaves the old worker serving; its words come from the
master's output (`<state>/proxy/haproxy.out`, or `--proxy-log` when attached). Started by
the agent: `haproxy -W -S <state>/proxy/master.sock -p … -C <state>/current -f
.agent-haproxy.cfg -f haproxy.cfg`. Attached: the same command run by a service manager;
the agent talks to its master socket.

Metrics: requests and 5xx responses of every frontend but the driver's own, from the
stats socket's `show stat`. No p99: HAProxy 2.6 reports latency only as averages.
"""

from __future__ import annotations

import os
import signal
import time

from agent_stub.applier import ApplyRequest
from agent_stub.drivers.base import ProxyDriver
from agent_stub.errors import ApplyFailed
from controlplane.api.node.v1 import node_pb2
from controlplane.proxies import haproxy
from controlplane.proxies.haproxy import CliError
from controlplane.proxies.http import HttpError
from controlplane.proxies.validate import bounded, validate
from controlplane.proxies.window import delta, ratio


class HaproxyDriver(ProxyDriver):
    kind = "haproxy"
    default_status = "127.0.0.1:9181"

    def setup(self) -> None:
        self.master_socket = self.config.control or self.run_dir / haproxy.MASTER_SOCKET
        self.stats_socket = self.run_dir / haproxy.STATS_SOCKET
        self.words_path = self.config.log if self.attach else self.out_path
        self._last: tuple[float, haproxy.FrontendTotals] | None = None

    def main_text(self, digest: str) -> str:
        return haproxy.render_main(run_dir=self.run_dir, status=self.status, digest=digest)

    async def prepare(self, request: ApplyRequest) -> None:
        # Absolute: the proxy resolves a relative path against its own prefix, not ours.
        tree = request.bundle_dir.absolute()
        self.require_files(request, haproxy.MAIN, haproxy.AGENT_MAIN)
        self.write_reserved(tree, haproxy.AGENT_MAIN, self.main_text(request.target.digest))
        argv = haproxy.validate_argv(self.binary, tree)
        verdict = await validate(self.binary, argv, tree=tree, seconds=self.validate_timeout)
        if not verdict.ok:
            raise ApplyFailed(verdict.reason())

    async def processes(self) -> haproxy.Processes | None:
        """The master's `show proc`; None when no master answers."""
        self.reap()
        try:
            return haproxy.parse_show_proc(await haproxy.cli(self.master_socket, "show proc"))
        except (CliError, ValueError):
            return None

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
            now = await self.processes()  # None while the master re-executes itself
            if now is None or now.reloads <= before.reloads:
                return None
            if now.failed_reloads > before.failed_reloads:
                raise ApplyFailed(bounded(f"haproxy did not load the bundle: {self._words(mark)}"))
            return await self._serving(digest)

        await self.until(loaded, f"load {digest}")

    async def _start(self, digest: str) -> None:
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
        if self.attach:
            return
        procs = await self.processes()
        if procs is not None:
            os.kill(procs.master_pid, signal.SIGUSR1)  # soft stop: finish connections, exit
            self.log.info("proxy.stopped", proxy=self.kind, pid=procs.master_pid)

    async def reconcile(self, request: ApplyRequest) -> None:
        digest = request.target.digest
        procs = await self.processes()
        if procs is None and self.attach:
            self.log.warning("reconcile.proxy_down", proxy=self.kind, socket=str(self.master_socket))
            return
        if procs is not None and await self._serving(digest):
            self.log.info("reconcile.serving", proxy=self.kind, pid=procs.master_pid, digest=digest)
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
