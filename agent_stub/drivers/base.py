"""What the nginx, HAProxy and Envoy drivers share: the proxy's run directory, starting
it (supervise) or finding it (attach), polling for a condition against the confirmation
deadline, the status endpoint, and the proxy's own output as a failure's reason.

    <state>/proxy/            the driver's run directory: pid file, sockets, logs
    <state>/proxy/<kind>.out  what a proxy the agent started printed (appended)
    <state>/current/.agent-*  the driver's main configuration for that bundle (nginx, HAProxy)

A proxy the agent starts runs in its own session and outlives the agent: a restarted
agent finds it again (pid file, master socket, admin address) instead of starting a
second one, and the node keeps serving while the agent is away.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import ClassVar, TypeVar

from agent_stub.applier import ApplyRequest, Driver
from agent_stub.config import ProxyConfig
from agent_stub.errors import ApplyFailed
from agent_stub.logs import EventLog
from controlplane.api.node.v1 import node_pb2
from controlplane.proxies import ProxyKind
from controlplane.proxies.binaries import Binary
from controlplane.proxies.http import Address, HttpError, get
from controlplane.proxies.validate import bounded

T = TypeVar("T")
# How often a confirmation looks again: a reload takes tens to hundreds of milliseconds.
POLL = 0.05
# Of the proxy's own output, the tail kept for a reason.
OUTPUT_TAIL_BYTES = 16 * 1024
# Timeout of one probe of the status endpoint: loopback answers in microseconds.
PROBE_TIMEOUT = 2.0


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rfind(")") + 2 :][:1] not in ("Z", "X")


def children(pid: int) -> list[int]:
    """The live children of `pid` (a master's workers)."""
    out = []
    with os.scandir("/proc") as entries:
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rfind(")") + 2 :].split()
            if len(fields) > 1 and fields[1] == str(pid) and fields[0] not in ("Z", "X"):
                out.append(int(entry.name))
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


class ProxyDriver(Driver):
    kind: ClassVar[ProxyKind]
    default_status: ClassVar[str]

    def __init__(
        self,
        binary: Binary,
        config: ProxyConfig,
        state_dir: Path,
        log: EventLog,
        *,
        validate_timeout: float = 60.0,
        node_id: Callable[[], str] = lambda: "",
    ):
        self.name = self.kind
        self.binary = binary
        self.config = config
        # Absolute: the proxy's configuration names these paths, and the proxy does not
        # run in the agent's working directory.
        state_dir = state_dir.absolute()
        self.current = state_dir / "current"
        self.run_dir = state_dir / "proxy"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.status = Address.parse(config.status or self.default_status)
        self.attach = config.run == "attach"
        self.timeout = config.confirm_timeout
        self.validate_timeout = validate_timeout
        self.node_id = node_id
        self.log = log
        self.out_path = self.run_dir / f"{self.kind}.out"
        # The proxy process this agent started (supervise), reaped when it exits.
        self.proc: subprocess.Popen[bytes] | None = None
        # Requests this driver made to the proxy's status endpoint (not traffic).
        self.own_requests = 0
        self.setup()

    def setup(self) -> None:
        """A driver's own state, once the common parts are in place."""

    # -- the proxy's process -------------------------------------------------------------

    def spawn(self, argv: Sequence[str], cwd: Path | None = None) -> subprocess.Popen[bytes]:
        """Start the proxy in the foreground, in its own session (a signal to the agent's
        process group does not reach it), its output appended to `<kind>.out`."""
        with open(self.out_path, "ab") as out:
            out.write(f"=== {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(argv)}\n".encode())
            out.flush()
            try:
                proc = subprocess.Popen(
                    list(argv),
                    cwd=cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as e:
                raise ApplyFailed(f"could not start {self.binary.path}: {e}") from None
        self.log.info("proxy.started", proxy=self.kind, pid=proc.pid)
        return proc

    def reap(self) -> None:
        """Collect our proxy's exit status (no zombie), and forget it once it is gone."""
        if self.proc is not None and self.proc.poll() is not None:
            self.log.warning("proxy.exited", proxy=self.kind, pid=self.proc.pid, code=self.proc.returncode)
            self.proc = None

    def output_mark(self, path: Path | None = None) -> int:
        try:
            return (path or self.out_path).stat().st_size
        except OSError:
            return 0

    def output_since(self, mark: int, path: Path | None = None) -> str:
        """What the proxy wrote to `path` (its output file) since `mark`: the tail."""
        target = path or self.out_path
        try:
            with open(target, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                start = max(mark, size - OUTPUT_TAIL_BYTES) if size >= mark else 0
                f.seek(start)
                data = f.read(OUTPUT_TAIL_BYTES)
        except OSError:
            return ""
        text = data.decode(errors="replace")
        lines = [line for line in text.splitlines() if line.strip() and not line.startswith("=== ")]
        return "\n".join(lines[-20:])

    # -- waiting for the proxy -------------------------------------------------------------

    async def until(self, check: Callable[[], Awaitable[T | None]], what: str) -> T:
        """Poll `check` until it returns a value (or raises ApplyFailed) within the
        confirmation timeout; ApplyFailed naming `what` after it."""
        deadline = time.monotonic() + self.timeout
        last = ""
        while True:
            try:
                result = await check()
            except (HttpError, OSError) as e:
                result, last = None, str(e)
            if result is not None:
                return result
            if time.monotonic() > deadline:
                seen = f" (last: {last})" if last else ""
                raise ApplyFailed(bounded(f"{self.kind} did not {what} within {self.timeout:g}s{seen}"))
            await asyncio.sleep(POLL)

    async def served(self, path: str) -> str | None:
        """The body of `path` on the status endpoint, None unless it answers 200."""
        self.own_requests += 1
        response = await get(self.status, path, seconds=PROBE_TIMEOUT)
        return response.text.strip() if response.status == 200 else None

    async def served_or_none(self, path: str) -> str | None:
        try:
            return await self.served(path)
        except HttpError:
            return None

    # -- common checks --------------------------------------------------------------------

    def require_files(self, request: ApplyRequest, main: str, reserved: str = "") -> None:
        """The bundle has its main configuration; it does not ship the name the driver
        writes its own main configuration to (a fresh extraction: only the archive's files)."""
        tree = request.bundle_dir
        if not (tree / main).is_file():
            present = sorted(p.name for p in tree.iterdir())[:10]
            raise ApplyFailed(
                f"the bundle has no {main} at its top: the {self.kind} driver runs {self.kind} from "
                f"{main} (files at the top: {', '.join(present) or 'none'})"
            )
        if reserved and (tree / reserved).exists():
            raise ApplyFailed(
                f"the bundle holds {reserved}, the name the agent writes its own configuration to"
            )

    def write_reserved(self, bundle_dir: Path, name: str, text: str) -> None:
        """The driver's main configuration, next to the bundle's own files (which it does
        not change). Written again on each activation, so a restarted agent with another
        status address or node id runs what it says."""
        try:
            (bundle_dir / name).write_text(text)
        except OSError as e:
            raise ApplyFailed(f"writing {name} into the bundle directory failed on this node: {e}") from None

    def health(self, status: node_pb2.HealthStatus.ValueType) -> node_pb2.NodeMetrics:
        return node_pb2.NodeMetrics(health=status)

    async def close(self) -> None:
        self.reap()
        for proc in self.started():
            detach(proc)

    def started(self) -> list[subprocess.Popen[bytes]]:
        """The proxy processes this agent started that still run."""
        return [self.proc] if self.proc is not None else []


def detach(proc: subprocess.Popen[bytes]) -> None:
    """Let the proxy run on after the agent forgets it. Popen has no detach: marked done,
    its finalizer neither warns that it still runs nor queues it to be reaped."""
    proc.returncode = 0
