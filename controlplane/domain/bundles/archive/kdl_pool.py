"""KDL parsing in worker processes, so no KDL file can freeze the server.

ckdl parses holding the GIL (an 8 MiB file takes over a second in one C call, and a
thread does not help: every watch stream of the server waits), and a parser written in
C can crash. So each KDL file is parsed and read into its `FileFacts`
(`kdl_config.read`) by one of a few worker processes, which reads the file itself and
sends back only those facts (plain data: the facts of a 100,000-route file unpickle in
about 0.2 s, where parsing it takes over 10 s; its parsed tree would take longer to
unpickle than to parse). A worker parses one file at a time:

- past `timeout` seconds it is killed and the file gets "took longer than …";
- it runs under an address-space limit (RLIMIT_AS), so a file that needs more memory
  gets "needs more than … MiB of memory" instead of growing the server;
- if it dies (a crash in the C library, the kernel's OOM killer, killed from outside)
  the file gets "the KDL parser crashed on this file (killed by signal …)".

Either way the file's result is an error naming it (a validation failure, or
"unparsed" for risk) and the next parse gets a fresh worker. A worker that had parsed
files before may have died while idle, so its death is blamed on a file only once a
fresh worker dies on it too.

`parse` blocks: it is called from the threads the bundle pipeline already parses in
(`asyncio.to_thread`), never from the event loop, and a thread waiting on a pipe holds
no GIL. Workers are started on first use (a fresh interpreter importing the parser,
about 0.25 s) and stopped by `close`; a parse
after `close`, or cut short by it, raises `KdlParsersClosed` rather than blaming the
file, so a push racing the server's shutdown is not stored as FAILED.
"""

from __future__ import annotations

import logging
import os
import queue
import resource
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

from controlplane.domain.bundles.archive import kdl_config
from controlplane.domain.bundles.archive.formats import Parsed

log = logging.getLogger(__name__)

MIB = 1024 * 1024


@dataclass(frozen=True)
class KdlLimits:
    # The server gives one per pipeline slot (bundles validated at once, one core each).
    workers: int = 2
    # A dense 6.4 MB file (100,000 routes) took 13-15 s in a worker on a shared, loaded
    # core (ckdl 1.3 s, the rest our tree and its facts), so an 8 MiB one (the parse
    # limit) about 20 s: three times that is a parser stuck, not a slow file.
    timeout: float = 60.0
    # That 6.4 MB file peaked at 350 MiB of address space (an 8 MiB one: about 450);
    # 1.5 GiB leaves room and still bounds what a hostile file can take from the host.
    # Past it the worker gets MemoryError, or ckdl crashes (SIGSEGV): either way the
    # file's error, not the server's memory.
    memory_bytes: int = 1536 * MIB


class KdlParsersClosed(RuntimeError):
    """The parsers were closed (the server is stopping): no file is to blame."""


# Why a worker gave no answer.
_TIMED_OUT = "timed out"
_DIED = "died"
# A worker that has not imported the parser in this long will not.
_START_TIMEOUT = 60.0
# A worker whose pipe closed is exiting: an interpreter ending on an uncaught error
# takes milliseconds; one still alive after this is killed.
_EXIT_GRACE = 5.0
_READY = "ready"
_WORKER = (
    "import sys; sys.path[:0] = sys.argv[3:]; "
    "from controlplane.domain.bundles.archive.kdl_pool import serve; "
    "serve(int(sys.argv[1]), int(sys.argv[2]))"
)


def serve(fd: int, memory_bytes: int) -> None:
    """A worker's body: parse (root, path) requests one at a time until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server's Ctrl-C is the server's
    if memory_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    conn = Connection(fd)
    conn.send(_READY)
    while True:
        try:
            root, path = conn.recv()
        except (EOFError, OSError):
            return
        too_big = Parsed(
            path, error=f"{path}: parsing it needs more than {memory_bytes // MIB} MiB of memory"
        )
        try:
            result = kdl_config.read(Path(root), path)
        except MemoryError:
            result = too_big
        except Exception as e:  # anything else of the parser: the file's error, not the worker's end
            result = Parsed(path, error=f"{path}: the KDL parser failed ({type(e).__name__})")
        try:
            conn.send(result)
        except MemoryError:  # pickling the facts, before a byte is sent
            conn.send(too_big)


class _Worker:
    """One worker: a fresh interpreter talking over a socket pair. Not multiprocessing's
    spawn or forkserver: they run the parent's main script again in every child (as
    `__mp_main__`, so a script without a `__main__` guard runs twice) and pass it the
    parent's whole environment."""

    def __init__(self, memory_bytes: int):
        ours, theirs = socket.socketpair()
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _WORKER, str(theirs.fileno()), str(memory_bytes), *sys.path],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                # A fresh interpreter holds none of the server's secrets in memory; nor
                # does it get them from the environment (the database URL, keys), in
                # case a hostile file ever takes over the C parser.
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"},
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.conn = Connection(ours.detach())
        self.pid = self.process.pid
        self.parses = 0
        try:
            ready = self.conn.recv() if self.conn.poll(_START_TIMEOUT) else None
        except (EOFError, OSError):
            ready = None
        if ready != _READY:
            self.stop()
            raise RuntimeError(f"a KDL parser process did not start ({self.how_it_ended()})")

    def exchange(self, root: Path, path: str, timeout: float) -> Parsed | str:
        """Its answer, or why there is none (_TIMED_OUT, _DIED)."""
        try:
            self.conn.send((str(root), path))
            if not self.conn.poll(timeout):
                return _TIMED_OUT
            result: Parsed = self.conn.recv()
        except (EOFError, OSError):
            return _DIED
        self.parses += 1
        return result

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()

    def stop(self, grace: float = 0.0) -> None:
        """Kill it (after `grace` seconds to exit by itself), collect its exit status and
        close its pipe."""
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            self.kill()
            self.process.wait()
        self.conn.close()

    def how_it_ended(self) -> str:
        code = self.process.returncode
        if code is None:
            return "still running"
        return f"killed by signal {-code}" if code < 0 else f"exit code {code}"


class KdlParsers:
    """A few worker processes parsing KDL files; thread-safe, `parse` blocks its thread."""

    def __init__(self, limits: KdlLimits | None = None):
        self.limits = limits or KdlLimits()
        self._lock = threading.Lock()
        # One item per worker slot: its idle worker, or None when none is started (yet,
        # or again). Taking an item is what lets a parse run.
        self._slots: queue.Queue[_Worker | None] = queue.Queue()
        for _ in range(self.limits.workers):
            self._slots.put(None)
        self._live: set[_Worker] = set()
        self._busy: dict[_Worker, str] = {}
        self._closed = False

    @property
    def busy(self) -> dict[int, str]:
        """pid → path of each worker parsing now."""
        with self._lock:
            return {w.pid: path for w, path in self._busy.items()}

    @property
    def pids(self) -> list[int]:
        """The workers started and not stopped."""
        with self._lock:
            return sorted(w.pid for w in self._live)

    def parse(self, root: Path, path: str) -> Parsed:
        """`root/path` read into FileFacts (the `document`) by a worker, or an error
        naming the file; KdlParsersClosed once `close` ran."""
        worker = self._slots.get()
        try:
            while True:
                if worker is None:
                    worker = self._start()
                answer = self._run(worker, root, path)
                if isinstance(answer, Parsed):
                    return answer
                # One that died may still be exiting (its pipe closes first): its own
                # exit status says why, not our SIGKILL.
                self._discard(worker, grace=_EXIT_GRACE if answer == _DIED else 0.0)
                dead, worker = worker, None
                if self._closed:
                    raise KdlParsersClosed("the KDL parsers were closed during the parse")
                if answer == _TIMED_OUT:
                    log.warning(
                        "KDL parse of %s took over %gs: worker %d killed", path, self.limits.timeout, dead.pid
                    )
                    return Parsed(
                        path,
                        error=f"{path}: parsing it took longer than {self.limits.timeout:g}s and was stopped",
                    )
                how = dead.how_it_ended()
                if dead.parses:  # it may have died idle: not this file's fault until a fresh one dies too
                    log.warning(
                        "KDL parser %d, used before, ended (%s) on %s: once more on a fresh one",
                        dead.pid,
                        how,
                        path,
                    )
                    continue
                log.error("the KDL parser crashed on %s (%s)", path, how)
                return Parsed(path, error=f"{path}: the KDL parser crashed on this file ({how})")
        finally:
            self._slots.put(worker)

    def _start(self) -> _Worker:
        if self._closed:
            raise KdlParsersClosed("the KDL parsers are closed")
        worker = _Worker(self.limits.memory_bytes)
        with self._lock:
            if not self._closed:
                self._live.add(worker)
                return worker
        worker.stop()  # closed while it started
        raise KdlParsersClosed("the KDL parsers are closed")

    def _run(self, worker: _Worker, root: Path, path: str) -> Parsed | str:
        with self._lock:
            # Checked under the lock `close` takes: a worker it saw idle stays idle.
            if self._closed:
                raise KdlParsersClosed("the KDL parsers are closed")
            self._busy[worker] = path
        try:
            return worker.exchange(root, path, self.limits.timeout)
        finally:
            with self._lock:
                del self._busy[worker]

    def _discard(self, worker: _Worker, grace: float) -> None:
        with self._lock:
            self._live.discard(worker)
        worker.stop(grace)

    def close(self) -> None:
        """Stop every worker (at server shutdown); later parses raise KdlParsersClosed,
        and so do parses it cuts short. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            busy = set(self._busy)
            idle = [w for w in self._live if w not in busy]
            self._live = busy
        for worker in busy:
            worker.kill()  # its parse ends, stops it and raises KdlParsersClosed
        for worker in idle:
            worker.stop()
