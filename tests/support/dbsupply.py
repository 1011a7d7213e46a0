"""Copies of a PostgreSQL template made before the tests that take them, and dropped
after them, off the tests' path.

CREATE DATABASE ... TEMPLATE writes the whole template through the WAL and waits for it
on the disk; DROP DATABASE waits on the disk too. Both are I/O more than CPU, so a thread
of the test process makes the next copy while a test runs and drops the last one behind
it. Every test still gets a database nobody else has used: only the waiting moved.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from tests.support import postgres

T = TypeVar("T")


class DatabaseSupply:
    """Hands out fresh copies of `template` (a database's URL), `ahead` of them made in
    advance, on an event loop of its own in a daemon thread."""

    def __init__(self, template: str, ahead: int = 1):
        self.template = template
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="db-supply", daemon=True)
        self._thread.start()
        self._closing = False
        self._drops: set[concurrent.futures.Future[None]] = set()
        self._started = self._submit(self._start(ahead))

    def _submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    async def _start(self, ahead: int) -> None:
        # Made on the supply's loop, which they belong to.
        self._ready: asyncio.Queue[str | BaseException] = asyncio.Queue()
        self._room = asyncio.Semaphore(ahead)
        self._filler = asyncio.create_task(self._fill())

    async def _fill(self) -> None:
        while True:
            await self._room.acquire()
            if self._closing:
                return
            try:
                made: str | BaseException = await postgres.create_database(template=self.template)
            except Exception as e:  # handed to the test that asks next: it fails saying why
                made = e
            self._ready.put_nowait(made)

    async def _next(self) -> str:
        made = await self._ready.get()
        self._room.release()
        if isinstance(made, BaseException):
            raise made
        return made

    async def take(self) -> str:
        """A fresh copy of the template, for the caller alone."""
        await asyncio.wrap_future(self._started)
        return await asyncio.wrap_future(self._submit(self._next()))

    def discard(self, url: str) -> None:
        """Drop `url` in the background (its users have stopped)."""
        dropping = self._submit(postgres.drop_database(url))
        self._drops.add(dropping)
        dropping.add_done_callback(self._drops.discard)

    async def _shutdown(self) -> None:
        self._closing = True
        self._room.release()  # a filler waiting for room wakes, sees the close, returns
        await self._filler  # a copy being made is finished and queued first
        while not self._ready.empty():
            made = self._ready.get_nowait()
            if isinstance(made, str):
                await postgres.drop_database(made)

    def close(self) -> None:
        """Stop making copies, drop those nobody took, wait for every drop."""
        self._started.result()
        self._submit(self._shutdown()).result()
        for dropping in list(self._drops):
            dropping.result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
