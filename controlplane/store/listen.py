"""LISTEN for notifications on PostgreSQL: new revisions (for the watch hub) and recorded
status reports (for the rollout driver, which may lead on another replica).

A notification is only a wake-up: the hub always catches up by its cursor and the driver
re-reads the rollout, so a notification lost while this reconnects costs latency (until
the periodic sweep or tick), never a change. LISTEN runs on its own connection, never a
pooled one. It connects like the pool does (store/pgconnect.py): to whichever host of a
multi-host URL is the primary, and after a failover to the new one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from controlplane.store.desired import NOTIFY_CHANNEL
from controlplane.store.nodes import REPORTS_CHANNEL
from controlplane.store.pgconnect import PgConnector

log = logging.getLogger(__name__)

# Longest wait between reconnects: the hub's 1 s sweep covers what is missed meanwhile,
# and a promoted primary is found within this of accepting connections.
_MAX_BACKOFF = 2.0


def _setter(event: asyncio.Event) -> Callable[[Any], None]:
    return lambda _conn: event.set()


class PgListener:
    def __init__(self, url: str, on_notify: Callable[[], None], on_reports: Callable[[], None] | None = None):
        self._connector = PgConnector(url)
        self._on_notify = on_notify
        self._on_reports = on_reports
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()
        # host:port of the server LISTENed on while connected.
        self.connected_to = ""

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="pg-listen")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def _notified(self, *_args: Any) -> None:
        self._on_notify()

    def _reported(self, *_args: Any) -> None:
        if self._on_reports is not None:
            self._on_reports()

    async def _run(self) -> None:
        backoff = 0.5
        while True:
            conn = None
            try:
                conn = await self._connector.connect()
                lost = asyncio.Event()
                conn.add_termination_listener(_setter(lost))
                await conn.add_listener(NOTIFY_CHANNEL, self._notified)
                await conn.add_listener(REPORTS_CHANNEL, self._reported)
                self.connected_to = self._connector.last_host
                self.connected.set()
                backoff = 0.5
                # Whatever was committed while we were not listening: catch up now.
                self._on_notify()
                self._reported()
                while not lost.is_set():
                    try:
                        async with asyncio.timeout(30):
                            await lost.wait()
                    except TimeoutError:
                        await conn.execute("SELECT 1")  # notice a silently dead socket
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("LISTEN connection lost (%s); reconnecting in %.1f s", e, backoff)
            finally:
                self.connected.clear()
                if conn is not None and not conn.is_closed():
                    await conn.close()
            await asyncio.sleep(backoff)
            # A failover is over in seconds: keep looking at least this often.
            backoff = min(backoff * 2, _MAX_BACKOFF)
