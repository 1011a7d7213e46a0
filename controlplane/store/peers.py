"""Wake-ups between the serving processes of one machine (`serve --workers N`).

Every serving process has its own hub. A process that commits a revision tells its peers
at once, on SQLite and PostgreSQL alike, without polling:

- a datagram to each peer's Unix socket (in the abstract namespace, named after the data
  directory and the peer's slot) carries the revision; the peer's event loop wakes on
  it and its hub reads the log from its own position. Only a wake-up: a datagram that
  does not fit (a peer far behind has many queued) is dropped, since the queued ones
  already make that peer read everything committed before its next read;
- a shared array of 64-bit slots in a small file beside the database, one per process,
  holds the newest revision each has committed. It is written before the write that
  committed returns, so a call that reaches any process afterwards finds it there and
  can wait for its hub to read it ("read your writes" across processes; see
  `WatchHub.sync`). Aligned 8-byte stores and loads (a memoryview cast to `Q`) are
  never torn.

A peer that is not running (restarting) has no socket: its datagrams are dropped, and it
reads everything when it starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import mmap
import os
import socket
import struct
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

_REVISION = struct.Struct("<Q")
HEADS_FILE = "worker-heads"


def create_heads(data_dir: Path, count: int) -> Path:
    """Make (or reset) the shared slots for `count` processes: done once by the parent,
    before any serving process starts."""
    path = data_dir / HEADS_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, bytes(_REVISION.size * max(1, count)))
    finally:
        os.close(fd)
    return path


class Peers:
    """This process's end: tells its peers what it committed, hears what they did."""

    def __init__(self, data_dir: Path, index: int, count: int, on_revision: Callable[[int], None]):
        self.index = index
        self.count = count
        self._on_revision = on_revision
        key = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:24]
        self._names = [f"\0controlplane-{key}-{i}".encode() for i in range(count)]
        self._path = data_dir / HEADS_FILE
        self._inbox: socket.socket | None = None
        self._outbox: socket.socket | None = None
        self._map: mmap.mmap | None = None
        self._slots: memoryview | None = None
        self._told = 0

    def start(self) -> None:
        fd = os.open(self._path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, _REVISION.size * self.count)
        finally:
            os.close(fd)
        self._slots = memoryview(self._map).cast("Q")
        inbox = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        inbox.setblocking(False)
        inbox.bind(self._names[self.index])
        self._inbox = inbox
        self._outbox = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._outbox.setblocking(False)
        asyncio.get_running_loop().add_reader(inbox.fileno(), self._drain)

    def stop(self) -> None:
        if self._inbox is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._inbox.fileno())
            self._inbox.close()
            self._inbox = None
        if self._outbox is not None:
            self._outbox.close()
            self._outbox = None
        if self._slots is not None:
            self._slots.release()
            self._slots = None
        if self._map is not None:
            self._map.close()
            self._map = None

    def committed(self, revision: int) -> None:
        """This process committed `revision` (called right after the commit, before the
        write's caller hears of it)."""
        if revision <= self._told or self._slots is None or self._outbox is None:
            return
        self._told = revision
        self._slots[self.index] = revision
        message = _REVISION.pack(revision)
        for i, name in enumerate(self._names):
            if i == self.index:
                continue
            # Not there (restarting) or its queue is full (it has wake-ups pending).
            with contextlib.suppress(BlockingIOError, ConnectionRefusedError, FileNotFoundError):
                self._outbox.sendto(message, name)

    def head(self) -> int:
        """The newest revision any process on this machine has committed (0 unknown)."""
        slots = self._slots
        return max(slots) if slots is not None else 0

    def _drain(self) -> None:
        inbox = self._inbox
        newest = 0
        while inbox is not None:
            try:
                data = inbox.recv(64)
            except (BlockingIOError, InterruptedError):
                break
            if len(data) == _REVISION.size:
                newest = max(newest, _REVISION.unpack(data)[0])
        if newest:
            self._on_revision(newest)
