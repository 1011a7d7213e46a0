"""A private PostgreSQL 15 primary and streaming standby, for failover tests.

Built from the machine's binaries (`initdb`, `pg_basebackup -R`, `pg_ctl promote`, and
`postgres` started as our own child), on free loopback ports in a temporary directory,
separate from the shared cluster on 5432. Every process is stopped by its pid: the
postmaster is our child, and its children are found through /proc.

PostgreSQL refuses to run as root; when the tests run as root the servers run as the
`postgres` user, in a directory it owns.

Replication is synchronous (`synchronous_standby_names = '*'`: a commit returns once the
standby has flushed it) or asynchronous. Loss is forced by stopping the primary's WAL
sender (SIGSTOP by pid): the primary keeps committing, nothing more reaches the standby,
and killing the primary then loses those commits for good. `promote()` also clears
`synchronous_standby_names` on the promoted server: `pg_basebackup` copied it, and a
primary with no standby of its own would make every commit wait forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from tests.support.ports import unused_port

PG_BIN = Path(os.environ.get("CONTROLPLANE_PG_BIN", "/usr/lib/postgresql/15/bin"))
DATABASE = "controlplane"
# Small and quick: these servers hold a test's few rows. fsync stays on (the default):
# the tests kill processes, and what a killed server loses must be what a real one would.
_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "shared_buffers": "16MB",
    "max_connections": "100",
    "wal_level": "replica",
    "max_wal_senders": "4",
    # The standby answers reads while it replays (the tests compare heads on it).
    "hot_standby": "on",
    # A dead primary is noticed at once through the closed socket; this only bounds a
    # silent one.
    "wal_receiver_timeout": "5s",
    "logging_collector": "off",
}


class PgClusterError(RuntimeError):
    pass


def _run_as() -> str | None:
    """The user the servers run as: `postgres` when we are root (PostgreSQL refuses)."""
    return "postgres" if os.geteuid() == 0 else None


def _chown(path: Path, user: str | None) -> None:
    if user is None:
        return
    entry = pwd.getpwnam(user)
    for root, dirs, files in os.walk(path):
        os.chown(root, entry.pw_uid, entry.pw_gid)
        for name in dirs + files:
            os.chown(os.path.join(root, name), entry.pw_uid, entry.pw_gid, follow_symlinks=False)


def _as(user: str | None, args: list[str]) -> list[str]:
    """`args` run as `user`, through setpriv rather than subprocess's `user=`: that one
    forks without exec'ing at once, and a fork of a process full of gRPC threads (the
    tests') can crash in gRPC's fork handlers before it gets to exec."""
    if user is None:
        return args
    return ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--", *args]


def _command(args: list[str], user: str | None, timeout: float = 120.0) -> str:
    """Run a PostgreSQL tool to completion; its output, or PgClusterError with it."""
    done = subprocess.run(
        _as(user, args), capture_output=True, text=True, timeout=timeout, check=False, cwd="/"
    )
    if done.returncode != 0:
        raise PgClusterError(f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return done.stdout


def _make_root(user: str | None) -> Path:
    """A temporary directory the servers' user can reach (pytest's tmp_path is private to
    the test's user), with a directory for the servers' Unix sockets."""
    root = Path(tempfile.mkdtemp(prefix="cp-pgcluster-"))
    root.chmod(0o755)
    (root / "sockets").mkdir()
    _chown(root, user)
    return root


def _spawn(args: list[str], log_path: Path, banner: str, user: str | None) -> subprocess.Popen[bytes]:
    """Start `args` as our child (so it is stopped by its pid), output appended to `log_path`."""
    with log_path.open("ab") as out:
        out.write(f"=== {banner}\n".encode())
        out.flush()
        return subprocess.Popen(
            _as(user, args), stdout=out, stderr=subprocess.STDOUT, cwd="/", start_new_session=True
        )


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (a postmaster's backends and auxiliaries)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: fields follow the last ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def _process_title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@dataclass
class PgServer:
    """One PostgreSQL server: a data directory, a port, and the postmaster we started."""

    name: str
    data_dir: Path
    socket_dir: Path
    port: int
    user: str | None
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"{self.name}.log"

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{DATABASE}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} was never started"
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def start(self, timeout: float = 60.0) -> None:
        assert not self.running, f"{self.name} is already running"
        args = [str(PG_BIN / "postgres"), "-D", str(self.data_dir), "-p", str(self.port)]
        args += ["-k", str(self.socket_dir)]
        for key, value in _SETTINGS.items():
            args += ["-c", f"{key}={value}"]
        self.proc = _spawn(args, self.log_path, f"start #{self.starts + 1}", self.user)
        self.starts += 1
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise PgClusterError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                conn = await asyncpg.connect(self.dsn.rsplit("/", 1)[0] + "/postgres", timeout=2)
            except (OSError, asyncpg.PostgresError, TimeoutError):
                if time.monotonic() > deadline:
                    raise PgClusterError(
                        f"{self.name} did not accept connections:\n{self.log()[-3000:]}"
                    ) from None
                await asyncio.sleep(0.1)
                continue
            await conn.close()
            return

    async def connect(self, database: str = DATABASE) -> asyncpg.Connection:
        return await asyncpg.connect(self.dsn.rsplit("/", 1)[0] + f"/{database}", timeout=5)

    async def fetchval(self, query: str, *args: Any, database: str = DATABASE) -> Any:
        conn = await self.connect(database)
        try:
            return await conn.fetchval(query, *args)
        finally:
            await conn.close()

    async def execute(self, query: str, *args: Any, database: str = DATABASE) -> None:
        conn = await self.connect(database)
        try:
            await conn.execute(query, *args)
        finally:
            await conn.close()

    async def in_recovery(self) -> bool:
        return bool(await self.fetchval("SELECT pg_is_in_recovery()", database="postgres"))

    async def stop(self, timeout: float = 30.0) -> None:
        """A fast shutdown (SIGINT to the postmaster): sessions end, WAL is flushed."""
        if not self.running:
            return
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        try:
            await asyncio.to_thread(self.proc.wait, timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            await asyncio.to_thread(self.proc.wait, 10)

    def kill(self) -> list[int]:
        """SIGKILL the postmaster and every process it forked, as a crash would: no
        shutdown checkpoint, no last WAL sent. Returns the pids killed."""
        if not self.running:
            return []
        postmaster = self.pid
        # Stopped first, so it forks nothing while its children are collected.
        os.kill(postmaster, signal.SIGSTOP)
        victims = _children(postmaster)
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        os.kill(postmaster, signal.SIGKILL)
        assert self.proc is not None
        self.proc.wait(10)
        return [postmaster, *victims]

    def auxiliary(self, title: str) -> int | None:
        """The pid of this server's child whose process title contains `title`
        (`walsender`, `walreceiver`, `startup`)."""
        if not self.running:
            return None
        for pid in _children(self.pid):
            if title in _process_title(pid):
                return pid
        return None


@dataclass
class PgCluster:
    """A primary and one streaming standby of it."""

    root: Path
    primary: PgServer
    standby: PgServer
    synchronous: bool
    user: str | None
    # WAL senders stopped by `pause_replication`, continued or killed by the harness.
    _stopped: list[int] = field(default_factory=list)
    # time.monotonic() when the promoted standby was first seen out of recovery.
    promoted_at: float | None = None

    @classmethod
    async def create(cls, synchronous: bool = True) -> PgCluster:
        user = _run_as()
        root = _make_root(user)
        sockets = root / "sockets"
        primary = PgServer("primary", root / "primary", sockets, unused_port(), user)
        standby = PgServer("standby", root / "standby", sockets, unused_port(), user)
        cluster = cls(root, primary, standby, synchronous, user)
        try:
            await cluster._build()
        except BaseException:
            await cluster.close()
            raise
        return cluster

    async def _build(self) -> None:
        await asyncio.to_thread(
            _command,
            [
                str(PG_BIN / "initdb"),
                "-D",
                str(self.primary.data_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "--encoding=UTF8",
                "--locale=C",
            ],
            self.user,
        )
        await self.primary.start()
        await self.primary.execute(f'CREATE DATABASE "{DATABASE}"', database="postgres")
        await asyncio.to_thread(
            _command,
            [
                str(PG_BIN / "pg_basebackup"),
                "-D",
                str(self.standby.data_dir),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.primary.port),
                "-U",
                "postgres",
                "-X",
                "stream",
                "-R",
                "--checkpoint=fast",
                "--no-sync",
            ],
            self.user,
        )
        await self.standby.start()
        await self.wait_streaming()
        if self.synchronous:
            await self.primary.execute(
                "ALTER SYSTEM SET synchronous_standby_names = '*'", database="postgres"
            )
            await self.primary.execute("SELECT pg_reload_conf()", database="postgres")

            async def synchronous() -> bool:
                state = await self.primary.fetchval(
                    "SELECT sync_state FROM pg_stat_replication", database="postgres"
                )
                return state == "sync"

            await _until(synchronous, 30, "the standby to become synchronous")

    def url(self, *servers: PgServer, read_write: bool = True) -> str:
        """The SQLAlchemy URL of `servers` (default: the primary, then the standby),
        libpq style, with `target_session_attrs=read-write` so a client finds whichever
        is primary."""
        hostlist = "&".join(f"host=127.0.0.1:{s.port}" for s in servers or (self.primary, self.standby))
        query = hostlist + ("&target_session_attrs=read-write" if read_write else "")
        return f"postgresql+asyncpg://postgres@/{DATABASE}?{query}"

    async def wait_streaming(self, timeout: float = 30.0) -> None:
        async def streaming() -> bool:
            return bool(
                await self.primary.fetchval(
                    "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'", database="postgres"
                )
            )

        await _until(streaming, timeout, "the standby to stream")

    async def wait_replayed(self, timeout: float = 30.0) -> None:
        """Until the standby has replayed everything the primary has written."""
        target = await self.primary.fetchval("SELECT pg_current_wal_lsn()", database="postgres")

        async def replayed() -> bool:
            lsn = await self.standby.fetchval("SELECT pg_last_wal_replay_lsn()", database="postgres")
            return lsn is not None and lsn >= target

        await _until(replayed, timeout, "the standby to replay the primary's WAL")

    async def pause_replication(self) -> int:
        """Stop the primary's WAL sender (SIGSTOP by pid): commits after this never reach
        the standby. Only for asynchronous replication (a synchronous commit would wait)."""
        assert not self.synchronous, "a synchronous primary would wait for the stopped standby"
        await self.wait_replayed()
        pid = int(
            await self.primary.fetchval("SELECT pid FROM pg_stat_replication LIMIT 1", database="postgres")
        )
        os.kill(pid, signal.SIGSTOP)
        self._stopped.append(pid)
        return pid

    def kill_primary(self) -> list[int]:
        self._stopped.clear()  # killed with the rest of the primary
        return self.primary.kill()

    async def promote(self, timeout: float = 60.0) -> None:
        """Promote the standby and wait until `pg_is_in_recovery()` is false on it; then
        clear `synchronous_standby_names` (inherited from the primary) so its commits
        do not wait for a standby it does not have."""
        # Not -w: pg_ctl would poll at its own pace; the moment matters to the benchmark.
        pg_ctl = [str(PG_BIN / "pg_ctl"), "promote", "-D", str(self.standby.data_dir), "-W"]
        await asyncio.to_thread(_command, pg_ctl, self.user)

        async def promoted() -> bool:
            return not await self.standby.in_recovery()

        await _until(promoted, timeout, "the standby to leave recovery", interval=0.01)
        self.promoted_at = time.monotonic()
        await self.standby.execute("ALTER SYSTEM RESET synchronous_standby_names", database="postgres")
        await self.standby.execute("SELECT pg_reload_conf()", database="postgres")

    async def close(self) -> None:
        for pid in self._stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self._stopped.clear()
        for server in (self.standby, self.primary):
            with contextlib.suppress(Exception):
                await server.stop(timeout=15)
            if server.running:
                server.kill()
        shutil.rmtree(self.root, ignore_errors=True)


async def _until(check: Any, timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise PgClusterError(f"timed out waiting for {what}")
        await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def pg_cluster(synchronous: bool = True) -> AsyncIterator[PgCluster]:
    cluster = await PgCluster.create(synchronous)
    try:
        yield cluster
    finally:
        await cluster.close()
