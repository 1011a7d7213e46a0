"""The nginx driver.

Validate: `nginx -t` on the new bundle's directory, through the driver's main
configuration written there (`.agent-nginx.conf`, which includes the bundle's
`nginx.conf`). Activate: nginx's master re-reads `<state>/current/.agent-nginx.conf` on
SIGHUP, so after the swap it loads the new bundle; the driver confirms a new worker
generation serves it (the status server answers the new digest and every old worker has
gone or is shutting down) or reads nginx's `[emerg]` words from the error log. Started
by the agent: `nginx -p <state>/proxy/ -c <state>/current/.agent-nginx.conf -g 'daemon off;'`.
Attached: the same command run by a service manager; the agent finds the master through
the pid file the driver's configuration names.

Metrics: request rate from stub_status (less the driver's own probes); 5xx rate and p99
from the access log the driver's configuration writes (`$status $request_time`), read
from where the previous heartbeat stopped.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from agent_stub.applier import ApplyRequest
from agent_stub.drivers.base import ProxyDriver, alive, children, cmdline, read_pid
from agent_stub.errors import ApplyFailed
from controlplane.api.node.v1 import node_pb2
from controlplane.proxies import nginx
from controlplane.proxies.http import HttpError
from controlplane.proxies.validate import bounded, validate
from controlplane.proxies.window import delta, quantile, ratio

# The access log is rotated past this size (renamed to .1, nginx told to reopen it).
ACCESS_LOG_ROTATE_BYTES = 64 * 1024 * 1024


class NginxDriver(ProxyDriver):
    kind = "nginx"
    default_status = "127.0.0.1:9180"

    def setup(self) -> None:
        self.pid_file = self.config.control or self.run_dir / nginx.PID_FILE
        self.error_log = self.run_dir / nginx.ERROR_LOG
        self.access = nginx.AccessLog(self.run_dir / nginx.ACCESS_LOG)
        self._last: tuple[float, int] | None = None

    def main_text(self, digest: str) -> str:
        return nginx.render_main(run_dir=self.run_dir, status=self.status, digest=digest)

    # -- validate ----------------------------------------------------------------------

    async def prepare(self, request: ApplyRequest) -> None:
        # Absolute: the proxy resolves a relative path against its own prefix, not ours.
        tree = request.bundle_dir.absolute()
        self.require_files(request, nginx.MAIN, nginx.AGENT_MAIN)
        self.write_reserved(tree, nginx.AGENT_MAIN, self.main_text(request.target.digest))
        argv = nginx.validate_argv(self.binary, tree / nginx.AGENT_MAIN, self.run_dir)
        verdict = await validate(self.binary, argv, tree=tree, seconds=self.validate_timeout)
        if not verdict.ok:
            raise ApplyFailed(verdict.reason())

    # -- the master ----------------------------------------------------------------------

    def master(self) -> int | None:
        self.reap()
        if self.proc is not None:
            return self.proc.pid
        pid = read_pid(self.pid_file)
        if pid is not None and alive(pid) and "nginx" in cmdline(pid):
            return pid
        return None

    async def activate(self, request: ApplyRequest) -> None:
        digest = request.target.digest
        self.write_reserved(request.bundle_dir.absolute(), nginx.AGENT_MAIN, self.main_text(digest))
        pid = self.master()
        if pid is None:
            await self._start(digest)
            return
        mark = self.output_mark(self.error_log)
        old = children(pid)
        os.kill(pid, signal.SIGHUP)
        self.log.info("proxy.reload", proxy=self.kind, pid=pid, digest=digest)
        await self._confirm(digest, pid, mark, old)

    async def _start(self, digest: str) -> None:
        if self.attach:
            # The service manager starts it (from `current`); wait until it serves.
            await self.until(lambda: self._serving(digest), f"start serving {digest} (attached: not running)")
            return
        mark = self.output_mark()
        self.proc = self.spawn(nginx.run_argv(self.binary, self.current / nginx.AGENT_MAIN, self.run_dir))
        proc = self.proc

        async def started() -> bool | None:
            if proc.poll() is not None:
                self.proc = None
                words = self.output_since(mark) or self.output_since(0, self.error_log)
                raise ApplyFailed(bounded(f"nginx exited with code {proc.returncode} at start: {words}"))
            return await self._serving(digest)

        await self.until(started, f"start serving {digest}")

    async def _serving(self, digest: str) -> bool | None:
        served = await self.served_or_none(nginx.BUNDLE_PATH)
        return True if served == digest else None

    async def _confirm(self, digest: str, pid: int, mark: int, old: list[int]) -> None:
        async def loaded() -> bool | None:
            if not alive(pid):
                words = self.output_since(mark, self.error_log)
                raise ApplyFailed(bounded(f"nginx's master exited while loading the bundle: {words}"))
            outcome = nginx.scan_reload(self.output_since(mark, self.error_log))
            if outcome.errors and not outcome.retrying:
                raise ApplyFailed(bounded("nginx did not load the bundle: " + "; ".join(outcome.errors)))
            if not await self._serving(digest):
                return None
            # A new worker answered; the generation is complete once no old worker still
            # accepts connections (each has exited or says it is shutting down).
            lingering = [w for w in old if alive(w) and "shutting down" not in cmdline(w)]
            return True if not lingering else None

        await self.until(loaded, f"load {digest} (no new worker generation serving it)")

    async def stop(self) -> None:
        pid = self.master()
        if pid is not None and not self.attach:
            os.kill(pid, signal.SIGQUIT)
            self.log.info("proxy.stopped", proxy=self.kind, pid=pid)

    async def reconcile(self, request: ApplyRequest) -> None:
        digest = request.target.digest
        pid = self.master()
        if pid is None and self.attach:
            self.log.warning("reconcile.proxy_down", proxy=self.kind, pid_file=str(self.pid_file))
            return
        if pid is not None and await self._serving(digest):
            self.log.info("reconcile.serving", proxy=self.kind, pid=pid, digest=digest)
            return
        self.log.warning("reconcile.reload", proxy=self.kind, pid=pid, digest=digest)
        await self.activate(request)

    # -- metrics -------------------------------------------------------------------------

    async def metrics(self, digest: str) -> node_pb2.NodeMetrics | None:
        if not digest:
            return None
        pid = self.master()
        if pid is None:
            self._last = None
            return self.health(node_pb2.HEALTH_STATUS_UNHEALTHY)
        try:
            served = await self.served(nginx.BUNDLE_PATH)
            stub = nginx.parse_stub_status((await self.served(nginx.STUB_STATUS_PATH)) or "")
        except (HttpError, ValueError):
            self._last = None
            return self.health(node_pb2.HEALTH_STATUS_UNHEALTHY)
        if self._last is None:
            # What is in the log already belongs to no window of ours.
            self.access.skip_to_end()
        window = self.access.read()
        self._rotate(pid)
        now = time.monotonic()
        out = self.health(
            node_pb2.HEALTH_STATUS_HEALTHY if served == digest else node_pb2.HEALTH_STATUS_UNHEALTHY
        )
        # stub_status counts every request, the driver's probes too: those are not traffic.
        requests = stub.requests - self.own_requests
        if self._last is not None:
            at, before = self._last
            out.requests_per_second = max(0.0, delta(before, requests)) / max(now - at, 1e-3)
            out.error_rate = ratio(window.errors, window.requests)
            p99 = quantile(window.latencies_ms, 0.99)
            if p99 is not None:
                out.p99_latency_ms = p99
        self._last = (now, requests)
        return out

    def _rotate(self, pid: int) -> None:
        path = self.access.path
        try:
            if path.stat().st_size < ACCESS_LOG_ROTATE_BYTES:
                return
            os.replace(path, Path(f"{path}.1"))
        except OSError:
            return
        os.kill(pid, signal.SIGUSR1)  # reopen the log files
