"""The Envoy driver: Envoy from files, by hot restart.

Validate: `envoy --mode validate -c <new tree>/envoy.yaml --config-yaml <overlay>` in the
new tree. Activate: start a new Envoy process from `<state>/current/envoy.yaml` with the
next `--restart-epoch` and the family's `--base-id`; it takes the listening sockets over
from the running one, which drains for `--drain-seconds` and exits. The driver confirms
on the admin API: `/server_info` answers from the new epoch, LIVE, with the new digest in
its node metadata. A new process that cannot start (a port it cannot bind, a bad runtime
setting) exits, and the old one keeps serving; bringing the previous bundle back is one
more hot restart from it, which also gives the admin API back (an Envoy hands its admin
listener to a child as soon as the child starts).

Why hot restart and not filesystem dynamic resources (LDS/CDS files Envoy watches): a
hot restart is a whole new configuration, bootstrap included, confirmed by asking the new
process; a failure is a process exit with Envoy's words, and the old process was never
touched. With watched files a swap is noticed by inotify, a rejected update leaves a
counter, a listener that cannot bind is a warning while the rest is applied, and nothing
ties what runs to a digest. Hot restart activates and confirms reliably; the cost is a
process start per change.

State: `<state>/proxy/envoy.json` names the live process (pid, epoch, digest) for a
restarted agent; `envoy.base-id` the shared-memory family; `envoy.log` Envoy's log.
Attaching to an Envoy a service manager runs is not offered: each change is a new
process, which the agent starts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from agent_stub.applier import ApplyRequest
from agent_stub.drivers.base import ProxyDriver, alive, cmdline, read_pid
from agent_stub.errors import ApplyFailed
from agent_stub.state import atomic_write
from controlplane.api.node.v1 import node_pb2
from controlplane.proxies import envoy
from controlplane.proxies.http import HttpError, get
from controlplane.proxies.validate import bounded, validate
from controlplane.proxies.window import delta, quantile, ratio

STATE_FILE = "envoy.json"
LOG_FILE = "envoy.log"
# /server_info is ~80 KB (every extension): polled only while confirming, not per beat.
SERVER_INFO_LIMIT = 4 * 1024 * 1024


# Envoy started with hot restart ends itself when the process that started it exits
# (PR_SET_PDEATHSIG): "it should never exist without its parent" (a hot restarter). A
# small shell is that parent for each Envoy, so Envoy outlives an agent that is stopped,
# upgraded or killed. It writes Envoy's pid to a file and exits with Envoy's status.
KEEPER = ("/bin/sh", "-c", 'pid_file=$1; shift; "$@" & echo $! > "$pid_file"; wait $!', "envoy-keeper")


async def _read_pid(path: Path, keeper: subprocess.Popen[bytes]) -> int | None:
    pid = read_pid(path)
    if pid is None and keeper.poll() is not None:
        raise ApplyFailed(f"envoy's keeper shell exited with code {keeper.returncode} before starting envoy")
    return pid


# Envoy's words when a family's last start died half-way (see `activate`).
_STUCK = "previous envoy process is still initializing"


class _Stuck(Exception):
    pass


@dataclass(frozen=True)
class Live:
    pid: int
    epoch: int
    digest: str


class EnvoyDriver(ProxyDriver):
    kind = "envoy"
    default_status = "127.0.0.1:9901"

    def setup(self) -> None:
        if self.attach:
            raise ValueError(
                "--proxy-run attach is not available for envoy: each change is a new Envoy process "
                "(hot restart) that the agent starts; run the agent under the service manager instead"
            )
        self.state_file = self.run_dir / STATE_FILE
        self.log_path = self.run_dir / LOG_FILE
        self.base_id_file = self.run_dir / envoy.BASE_ID_FILE
        # Every Envoy process this agent started and has not reaped (old epochs drain and exit).
        self.procs: list[subprocess.Popen[bytes]] = []
        self._last: tuple[float, envoy.Stats] | None = None

    def overlay(self, digest: str) -> str:
        return envoy.overlay(admin=self.status, node_id=self.node_id(), digest=digest)

    async def prepare(self, request: ApplyRequest) -> None:
        self.require_files(request, envoy.MAIN)
        tree = request.bundle_dir.absolute()
        argv = envoy.validate_argv(self.binary, tree / envoy.MAIN, self.overlay(request.target.digest))
        verdict = await validate(self.binary, argv, tree=tree, seconds=self.validate_timeout, cwd=tree)
        if not verdict.ok:
            raise ApplyFailed(replace(verdict, output=envoy.words(verdict.output)).reason())

    # -- the live process ------------------------------------------------------------------

    def live(self) -> Live | None:
        try:
            data = json.loads(self.state_file.read_text())
            record = Live(int(data["pid"]), int(data["epoch"]), str(data["digest"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        self._reap()
        if alive(record.pid) and "envoy" in cmdline(record.pid):
            return record
        return None

    def _reap(self) -> None:
        self.procs = [proc for proc in self.procs if proc.poll() is None]

    def _base_id(self) -> int | None:
        try:
            return int(self.base_id_file.read_text().strip())
        except (OSError, ValueError):
            return None

    async def activate(self, request: ApplyRequest) -> None:
        digest = request.target.digest
        parent = self.live()
        if parent is None:
            await self._start(digest, epoch=0, base_id=None)
            return
        try:
            await self._start(digest, epoch=parent.epoch + 1, base_id=self._base_id())
        except _Stuck:
            # A new process that died while starting (a bundle refused at run time) leaves
            # its family's shared memory marked "initializing" for good, and the old
            # process without its admin API. A new family is started beside it (Envoy's
            # listeners set SO_REUSEPORT, so both bind the same ports) and the old process
            # is stopped once the new one serves.
            self.log.warning("proxy.new_family", proxy=self.kind, replaces=parent.pid, digest=digest)
            await self._start(digest, epoch=0, base_id=None)
            os.kill(parent.pid, signal.SIGTERM)

    async def _start(self, digest: str, *, epoch: int, base_id: int | None) -> None:
        if base_id is None:
            self.base_id_file.unlink(missing_ok=True)
        mark, out_mark = self.output_mark(self.log_path), self.output_mark()
        argv = envoy.run_argv(
            self.binary,
            self.current / envoy.MAIN,
            self.overlay(digest),
            epoch=epoch,
            run_dir=self.run_dir,
            base_id=base_id,
            drain_seconds=self.config.drain_seconds,
            log_path=self.log_path,
        )
        # Its working directory is the bundle (`current` resolved now), so relative paths
        # in envoy.yaml are relative to it; each later bundle gets its own process.
        pid_file = self.run_dir / f"envoy-{epoch}.pid"
        pid_file.unlink(missing_ok=True)
        proc = self.spawn([*KEEPER, str(pid_file), *argv], cwd=self.current)
        self.procs.append(proc)
        pid = await self.until(lambda: _read_pid(pid_file, proc), f"start (epoch {epoch})")
        self.log.info("proxy.hot_restart", proxy=self.kind, pid=pid, epoch=epoch, digest=digest)

        async def live() -> bool | None:
            if proc.poll() is not None:
                # Errors before its logger is set up go to stderr (<kind>.out).
                words = envoy.words(
                    "\n".join(
                        filter(None, (self.output_since(mark, self.log_path), self.output_since(out_mark)))
                    )
                )
                if _STUCK in words and epoch > 0:
                    raise _Stuck(words)
                raise ApplyFailed(
                    bounded(f"envoy (epoch {epoch}) exited with code {proc.returncode}: {words}")
                )
            info = await get(self.status, "/server_info", seconds=2.0, limit=SERVER_INFO_LIMIT)
            if info.status != 200:
                return None
            served, state, served_epoch = envoy.served_digest(info.text)
            return True if (served, state, served_epoch) == (digest, "LIVE", epoch) else None

        await self.until(live, f"serve {digest} from a new process (epoch {epoch})")
        atomic_write(self.state_file, json.dumps(asdict(Live(pid, epoch, digest))).encode())
        self._last = None

    def started(self) -> list[subprocess.Popen[bytes]]:
        self._reap()
        return list(self.procs)

    async def stop(self) -> None:
        record = self.live()
        if record is not None:
            os.kill(record.pid, signal.SIGTERM)
            self.log.info("proxy.stopped", proxy=self.kind, pid=record.pid)

    async def reconcile(self, request: ApplyRequest) -> None:
        digest = request.target.digest
        record = self.live()
        if record is not None:
            try:
                info = await get(self.status, "/server_info", seconds=2.0, limit=SERVER_INFO_LIMIT)
                served, state, epoch = envoy.served_digest(info.text)
            except (HttpError, ValueError):
                served, state, epoch = "", "", -1
            if (served, state, epoch) == (digest, "LIVE", record.epoch):
                self.log.info("reconcile.serving", proxy=self.kind, pid=record.pid, digest=digest)
                return
        self.log.warning(
            "reconcile.restart", proxy=self.kind, live=record.digest if record else None, digest=digest
        )
        await self.activate(request)

    # -- metrics -------------------------------------------------------------------------

    async def metrics(self, digest: str) -> node_pb2.NodeMetrics | None:
        if not digest:
            return None
        record = self.live()
        if record is None:
            self._last = None
            return self.health(node_pb2.HEALTH_STATUS_UNHEALTHY)
        try:
            response = await get(self.status, envoy.STATS_PATH, seconds=2.0)
            stats = envoy.parse_stats(response.text) if response.status == 200 else None
        except (HttpError, ValueError):
            stats = None
        if stats is None:
            self._last = None
            return self.health(node_pb2.HEALTH_STATUS_UNHEALTHY)
        # Healthy: the process we confirmed answers (its epoch), LIVE, for this digest.
        # A gauge never moved from 0 is left out of `usedonly` output: no epoch is epoch 0.
        ok = record.digest == digest and (stats.epoch or 0) == record.epoch and stats.state == 0
        out = self.health(node_pb2.HEALTH_STATUS_HEALTHY if ok else node_pb2.HEALTH_STATUS_UNHEALTHY)
        now = time.monotonic()
        if self._last is not None:
            at, before = self._last
            completed = delta(before.completed, stats.completed)
            out.requests_per_second = completed / max(now - at, 1e-3)
            out.error_rate = ratio(delta(before.errors, stats.errors), completed)
            # Envoy's histograms move at its stats flush (every 5 s): the p99 is that of
            # the last flush interval, which is at most one interval old.
            p99 = quantile(stats.latency, 0.99)
            if p99 is not None:
                out.p99_latency_ms = p99
        self._last = (now, stats)
        return out
