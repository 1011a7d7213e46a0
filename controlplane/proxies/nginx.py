"""nginx: the main configuration the driver runs it from, its validator, its statistics.

The bundle's `nginx.conf` holds `http`-level configuration (upstreams, servers, maps) and
is included, unchanged, by a main configuration of the driver's own: `pid`, `error_log`,
`events`, and in `http` a log format with `$status $request_time`, the access log, and a
status server on loopback answering `/agent/bundle` (the digest this configuration was
made for) and `/agent/stub_status`. nginx resolves relative paths against the directory of
the file it is started with, so that file sits in the bundle's own directory: relative
paths in a bundle are relative to its `nginx.conf`, for `nginx -t` on a new tree and for
the running master alike.
"""

from __future__ import annotations

import collections
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from controlplane.proxies.binaries import Binary
from controlplane.proxies.http import Address

MAIN = "nginx.conf"
AGENT_MAIN = ".agent-nginx.conf"
PID_FILE = "nginx.pid"
ERROR_LOG = "error.log"
ACCESS_LOG = "access.log"
LOG_FORMAT = "controlplane_agent"
BUNDLE_PATH = "/agent/bundle"
STUB_STATUS_PATH = "/agent/stub_status"
_UNSAFE = re.compile(r'["\\\n\r;{}$]')


def _quoted(path: Path) -> str:
    if _UNSAFE.search(str(path)):
        raise ValueError(f"{path} holds a character nginx's configuration cannot take here")
    return f'"{path}"'


def render_main(
    *, run_dir: Path, status: Address, digest: str, main: str = MAIN, workers: str = "auto"
) -> str:
    """The driver's main configuration for the bundle whose digest is `digest`."""
    if not re.fullmatch(r"[A-Za-z0-9:._-]*", digest) or not re.fullmatch(r"auto|[1-9][0-9]{0,3}", workers):
        raise ValueError("digest or worker count not usable in nginx's configuration")
    return f"""# Written by the control plane agent; the bundle's own files are included unchanged.
pid {_quoted(run_dir / PID_FILE)};
error_log {_quoted(run_dir / ERROR_LOG)} notice;
worker_processes {workers};
events {{ worker_connections 1024; }}
http {{
    log_format {LOG_FORMAT} '$status $request_time';
    access_log {_quoted(run_dir / ACCESS_LOG)} {LOG_FORMAT};
    server {{
        listen {status} ;
        access_log off;
        location = {BUNDLE_PATH} {{ default_type text/plain; return 200 "{digest}"; }}
        location = {STUB_STATUS_PATH} {{ stub_status; }}
        location / {{ return 404; }}
    }}
    include {_quoted(Path(main))};
}}
"""


def validate_argv(binary: Binary, conf: Path, run_dir: Path) -> list[str]:
    """`nginx -t` of the configuration `conf` (the driver's main file in a bundle dir)."""
    return [str(binary.path), "-t", "-q", "-p", f"{run_dir}/", "-c", str(conf)]


def run_argv(binary: Binary, conf: Path, run_dir: Path) -> list[str]:
    """The master in the foreground, so whoever starts it sees it exit."""
    return [str(binary.path), "-p", f"{run_dir}/", "-c", str(conf), "-g", "daemon off;"]


@dataclass(frozen=True)
class StubStatus:
    active: int
    accepts: int
    handled: int
    requests: int


def parse_stub_status(text: str) -> StubStatus:
    """nginx's stub_status page; ValueError if it is not one."""
    match = re.search(
        r"Active connections:\s*(\d+).*?server accepts handled requests\s+(\d+)\s+(\d+)\s+(\d+)", text, re.S
    )
    if match is None:
        raise ValueError(f"not a stub_status page: {text[:80]!r}")
    active, accepts, handled, requests = (int(g) for g in match.groups())
    return StubStatus(active, accepts, handled, requests)


# What a failed reload leaves in the error log after "reconfiguring".
_EMERG = re.compile(r"\[(emerg|alert|crit)\] \d+#\d+: (.*)")
_BIND_RETRY = re.compile(r"try again to bind\(\)")


@dataclass(frozen=True)
class ReloadLog:
    """The error log's lines since a reload signal, as far as they decide it."""

    # nginx's words for why the new configuration was not loaded.
    errors: tuple[str, ...]
    # nginx is still retrying a bind (it tries 5 times, 500 ms apart) before giving up.
    retrying: bool


def scan_reload(text: str) -> ReloadLog:
    errors = tuple(m.group(2).strip() for m in _EMERG.finditer(text))
    lines = [line for line in text.splitlines() if line.strip()]
    retrying = bool(lines) and bool(_BIND_RETRY.search(lines[-1]))
    return ReloadLog(errors, retrying)


@dataclass
class LogWindow:
    """Requests the access log recorded since the previous read."""

    requests: int = 0
    errors: int = 0
    # $request_time in milliseconds -> how many requests took it.
    latencies_ms: collections.Counter[float] = field(default_factory=collections.Counter)


class AccessLog:
    """Reads the driver's access log (`$status $request_time` per line) from where the
    previous read stopped. Bounded: at most `max_bytes` per read (past that, the oldest
    lines of the window are skipped); a file that was rotated or truncated is read again
    from its start."""

    def __init__(self, path: Path, max_bytes: int = 8 * 1024 * 1024):
        self.path = path
        self.max_bytes = max_bytes
        self._inode: int | None = None
        self._offset = 0
        self.skipped_bytes = 0

    def skip_to_end(self) -> None:
        """Start from now on: what is already in the file belongs to no window."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._inode, self._offset = None, 0
            return
        self._inode, self._offset = st.st_ino, st.st_size

    def read(self) -> LogWindow:
        window = LogWindow()
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            self._inode, self._offset = None, 0
            return window
        try:
            st = os.fstat(fd)
            if st.st_ino != self._inode or st.st_size < self._offset:
                self._inode, self._offset = st.st_ino, 0
            start = self._offset
            if st.st_size - start > self.max_bytes:
                self.skipped_bytes += st.st_size - self.max_bytes - start
                start = st.st_size - self.max_bytes
            raw = os.pread(fd, st.st_size - start, start)
        finally:
            os.close(fd)
        # Skipped ahead: the first line is probably cut.
        begin = raw.find(b"\n") + 1 if start > self._offset else 0
        # An unfinished last line waits for the next read.
        end = max(begin, raw.rfind(b"\n") + 1)
        self._offset = start + end
        data = raw[begin:end]
        # Lines repeat a lot (a few statuses times a few durations): count them first.
        for line, count in collections.Counter(data.split(b"\n")).items():
            status, _, took = line.partition(b" ")
            if len(status) != 3 or not status.isdigit():
                continue
            window.requests += count
            if status.startswith(b"5"):
                window.errors += count
            try:
                window.latencies_ms[float(took) * 1000.0] += count
            except ValueError:
                continue
        return window
