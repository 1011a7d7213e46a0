"""Who holds leases, and proof that a holder is gone.

A lease holder is one serving process in one incarnation:
`<replica>/<process>#<incarnation>`. The replica name is stable (the host name, or
`--replica-id`), the process is its slot on the machine (0 for the only one, 0..N-1 once
several serving processes share a machine), and the incarnation is new at every start,
so a restarted process is never mistaken for the one before it.

Every holder keeps a lock for as long as it lives, which the operating system or the
database drops the moment the process dies:

- on PostgreSQL a session advisory lock on the lease keeper's dedicated connection
  (store/lease_keeper.py); PostgreSQL releases it when the connection ends, which a
  killed process's connection does at once;
- on SQLite (one machine) an flock on a file per holder beside the database.

A lease whose holder's lock can be taken belongs to a dead process: another holder may
take it at once instead of waiting for it to expire, still with a new epoch, so anything
the old holder might still write is fenced. A holder that is merely slow (a long pause,
a stalled loop) keeps its lock, and its lease runs its course.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import secrets
import socket
from pathlib import Path

# The advisory lock namespace of holders' liveness locks (PostgreSQL's two-key form;
# the migration lock uses the one-key form, a different key space).
PG_LIVENESS_NAMESPACE = 0x6C697665

_SAFE = re.compile(r"[^A-Za-z0-9._-]")


def holder_identity(replica: str = "", process: int = 0) -> str:
    """`<replica>/<process>#<incarnation>`, at most 100 characters (the leases column)."""
    name = _SAFE.sub("-", replica or socket.gethostname() or "replica")[:64]
    return f"{name}/{process}#{secrets.token_hex(6)}"


def replica_of(holder: str) -> str:
    """`<replica>/<process>` of a holder: the same for every incarnation."""
    return holder.rsplit("#", 1)[0]


class FileLiveness:
    """Liveness locks as flock()ed files in one directory (SQLite: one machine).

    flock() locks belong to the open file, so two holders in one process (tests run
    replicas in-process) exclude each other like two processes do."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._held: dict[str, int] = {}

    def _path(self, holder: str) -> Path:
        return self.directory / f"{hashlib.sha256(holder.encode()).hexdigest()[:32]}.lock"

    def hold(self, holder: str) -> None:
        """Take `holder`'s lock for as long as this process lives (or until release)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._path(holder), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise
        self._held[holder] = fd

    def release(self, holder: str) -> None:
        fd = self._held.pop(holder, None)
        if fd is not None:
            with contextlib.suppress(FileNotFoundError):
                self._path(holder).unlink()
            os.close(fd)

    def gone(self, holder: str) -> bool:
        """True when no live process holds `holder`'s lock."""
        if holder in self._held:
            return False
        try:
            fd = os.open(self._path(holder), os.O_RDWR)
        except FileNotFoundError:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        finally:
            os.close(fd)  # closing drops the probe's lock
        with contextlib.suppress(FileNotFoundError):
            self._path(holder).unlink()
        return True
