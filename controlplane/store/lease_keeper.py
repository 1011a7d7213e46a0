"""The lease keeper (PostgreSQL): renews this process's leases on a thread of its own.

The rollout driver takes leases on the server's event loop, but renewing them there
would tie a lease's life to the loop's: a fan-out to ten thousand streams, a heap
collection, a burst of reconnects can hold the loop for a second, and a replica whose
renewal waits behind that loses leases it is perfectly able to keep. The keeper runs
its own event loop in its own thread with its own connection, and:

- holds this holder's liveness lock (store/liveness.py): a session advisory lock on
  that connection, dropped by PostgreSQL the moment the process dies, which lets
  another replica take this process's leases at once;
- every `interval`, renews every lease it was asked to keep in one statement, and
  records until when each is good (the holder's own monotonic deadline: it steps down
  once that passes, renewal or not). A lease the statement did not renew (another
  holder took it) is lost at once;
- renews a lease only while the event loop still asks about it (the rollout driver
  checks each lease it holds on every pass): a loop held up for a second keeps its
  leases, a driver that stopped for good lets them expire and be taken over.

If its connection breaks, the liveness lock goes with it: another replica may then take
these leases (fenced, as always); the keeper reconnects, takes the lock again, and
renews what is still ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from datetime import timedelta

from controlplane.domain.kernel.clock import utcnow
from controlplane.domain.model.leases import Lease
from controlplane.store.liveness import PG_LIVENESS_NAMESPACE
from controlplane.store.pgconnect import PgConnector

log = logging.getLogger(__name__)

# After a failed connection: retry this soon (a database failover is over in seconds).
_RECONNECT = 0.5
# A lease nobody asked about for this many times its life is not renewed any more:
# far beyond any pause of a working loop, well short of forever for a stuck driver.
_UNASKED_TTLS = 5


class PgLeaseKeeper:
    def __init__(self, url: str, holder: str, ttl: timedelta, interval: float | None = None):
        self.holder = holder
        self.ttl = ttl
        # A third of the time to live: two renewals may fail before a lease lapses.
        self.interval = interval if interval is not None else ttl.total_seconds() / 3
        self._connector = PgConnector(url)
        self._lock = threading.Lock()
        # name -> (epoch, monotonic deadline), for the leases we were asked to keep, and
        # when the loop last asked about each.
        self._kept: dict[str, tuple[int, float]] = {}
        self._asked: dict[str, float] = {}
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.alive = threading.Event()  # set while the liveness lock is held
        self.renewals = 0

    # -- the event loop's side ------------------------------------------------------

    def keep(self, lease: Lease) -> None:
        with self._lock:
            self._kept[lease.name] = (lease.epoch, lease.local_deadline)
            self._asked[lease.name] = time.monotonic()

    def forget(self, name: str) -> None:
        with self._lock:
            self._kept.pop(name, None)
            self._asked.pop(name, None)

    def deadline(self, lease: Lease) -> float:
        """Until when `lease` is ours (monotonic); 0 once it is lost. Asking keeps it
        renewed."""
        with self._lock:
            epoch, deadline = self._kept.get(lease.name, (lease.epoch, lease.local_deadline))
            if lease.name in self._asked:
                self._asked[lease.name] = time.monotonic()
        return deadline if epoch == lease.epoch else 0.0

    async def start(self, wait: float = 30.0) -> None:
        """Start the thread; return once it holds the liveness lock (or after `wait`:
        it keeps trying, and until then other replicas may take leases this process
        takes, which the epoch fences)."""
        self._thread = threading.Thread(target=self._main, name="lease-keeper", daemon=True)
        self._thread.start()
        if not await asyncio.to_thread(self.alive.wait, wait):
            log.warning("lease keeper: no liveness lock after %.0f s; still trying", wait)

    async def stop(self) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already ended
                loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)

    # -- the keeper's thread ------------------------------------------------------------

    def _main(self) -> None:
        asyncio.run(self._run())

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        while not self._stop.is_set():
            conn = None
            try:
                conn = await self._connector.connect()
                await conn.execute(
                    "SELECT pg_advisory_lock($1, hashtext($2))", PG_LIVENESS_NAMESPACE, self.holder
                )
                self.alive.set()
                while not self._stop.is_set():
                    await self._renew(conn)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self.interval):
                            await self._stop.wait()
            except Exception as e:
                log.warning("lease keeper: %s; reconnecting", e)
            finally:
                self.alive.clear()
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close(timeout=2)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_RECONNECT):
                    await self._stop.wait()

    async def _renew(self, conn: object) -> None:
        started = time.monotonic()
        unasked = started - _UNASKED_TTLS * self.ttl.total_seconds()
        with self._lock:
            kept = {n: v for n, v in self._kept.items() if self._asked.get(n, 0.0) > unasked}
        if not kept:
            return
        now = utcnow()
        rows = await conn.fetch(  # type: ignore[attr-defined]
            "UPDATE leases SET renewed_at = $1, expires_at = $2 "
            "WHERE holder = $3 AND name = ANY($4::text[]) RETURNING name, epoch",
            now,
            now + self.ttl,
            self.holder,
            list(kept),
        )
        renewed = {r["name"]: int(r["epoch"]) for r in rows}
        self.renewals += 1
        with self._lock:
            for name, (epoch, _) in kept.items():
                if self._kept.get(name, (None, 0.0))[0] != epoch:
                    continue  # forgotten, or taken again under a new epoch, meanwhile
                if renewed.get(name) == epoch:
                    self._kept[name] = (epoch, started + self.ttl.total_seconds())
                else:
                    # Another holder has it (a new epoch): ours no longer.
                    self._kept[name] = (epoch, 0.0)
