"""LISTEN for notifications on PostgreSQL: new revisions (for the watch hub) and recorded
status reports (for the rollout driver, which may lead on another replica).

A notification is only a wake-up: the hub always catches up by its cursor and the driver
re-reads the rollout, so a notification lost while this reconnects costs latency (until
the periodic sweep or tick), never a change. LISTEN runs on its own connection, never a
pooled one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

from controlplane.store.desired import NOTIFY_CHANNEL
from controlplane.store.nodes import REPORTS_CHANNEL

log = logging.getLogger(__name__)


def _setter(event: asyncio.Event) -> Callable[[Any], None]:
    return lambda _conn: event.set()


class PgListener:
    def __init__(self, url: str, on_notify: Callable[[], None], on_reports: Callable[[], None] | None = None):
        sa_url = make_url(url)
        self._dsn = sa_url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._on_notify = on_notify
        self._on_reports = on_reports
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

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
                conn = await asyncpg.connect(self._dsn)
                lost = asyncio.Event()
                conn.add_termination_listener(_setter(lost))
                await conn.add_listener(NOTIFY_CHANNEL, self._notified)
                await conn.add_listener(REPORTS_CHANNEL, self._reported)
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
            except Exception:
                log.warning("LISTEN connection lost; reconnecting in %.1f s", backoff, exc_info=True)
            finally:
                self.connected.clear()
                if conn is not None and not conn.is_closed():
                    await conn.close()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)
