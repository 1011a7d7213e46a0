"""Copies of a PostgreSQL template made before the tests that take them, and put back
into the template's state after them, off the tests' path.

CREATE DATABASE ... TEMPLATE writes the whole template through the WAL and waits for it
on the disk (~0.25 s here); DROP DATABASE waits on the disk too. So a thread of the test
process makes a copy ahead, and a copy a test is done with is reset for the next one
(tests/support/pgreset.py: its rows deleted, the template's seed rows and sequence
positions put back, in milliseconds) unless something could tell it from a fresh copy,
in which case it is dropped. Every test gets a database in exactly the template's state
that no one else is using.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from tests.support import pgreset, postgres

# A copy serves this many tests, then is dropped (the dead rows of its resets go with it).
MAX_USES = 100

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
        # Used copies being reset, those ready again, and how often each served.
        self._recycling: set[asyncio.Task[None]] = set()
        self._spares: list[str] = []
        self._uses: dict[str, int] = {}
        self._started = self._submit(self._start(ahead))

    def _submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    async def _start(self, ahead: int) -> None:
        # Made on the supply's loop, which they belong to.
        self._ready: asyncio.Queue[str | BaseException] = asyncio.Queue()
        self._room = asyncio.Semaphore(ahead)
        self._state = await pgreset.read_state(self.template)
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
        # A copy being reset is ready in milliseconds: wait for it rather than take (and
        # so have the filler make) another.
        while not self._spares and self._recycling:
            await asyncio.wait(set(self._recycling), return_when=asyncio.FIRST_COMPLETED)
        if self._spares:
            return self._spares.pop()
        made = await self._ready.get()
        self._room.release()
        if isinstance(made, BaseException):
            raise made
        return made

    async def take(self) -> str:
        """A database in the template's state, for the caller alone."""
        await asyncio.wrap_future(self._started)
        return await asyncio.wrap_future(self._submit(self._next()))

    def discard(self, url: str) -> None:
        """Reset `url` for the next test, or drop it, in the background (its users have
        stopped). Queued before any later `take`, which waits for it."""
        self._started.result()
        self._loop.call_soon_threadsafe(self._recycle_soon, url)

    def _recycle_soon(self, url: str) -> None:
        task = self._loop.create_task(self._recycle(url))
        self._recycling.add(task)
        task.add_done_callback(self._recycling.discard)

    async def _recycle(self, url: str) -> None:
        uses = self._uses.pop(url, 0) + 1
        try:
            reusable = uses < MAX_USES and not self._closing and await pgreset.reset(url, self._state)
        except Exception:  # the copy is dropped and a fresh one made instead
            reusable = False
        if reusable:
            self._uses[url] = uses
            self._spares.append(url)
        else:
            await postgres.drop_database(url)

    async def _shutdown(self) -> None:
        self._closing = True
        self._room.release()  # a filler waiting for room wakes, sees the close, returns
        await self._filler  # a copy being made is finished and queued first
        while self._recycling:
            await asyncio.wait(set(self._recycling))
        for spare in self._spares:
            await postgres.drop_database(spare)
        self._spares.clear()
        while not self._ready.empty():
            made = self._ready.get_nowait()
            if isinstance(made, str):
                await postgres.drop_database(made)

    def close(self) -> None:
        """Stop making copies, drop those nobody took, wait for every drop. Idempotent."""
        if self._loop.is_closed():
            return
        self._started.result()
        self._submit(self._shutdown()).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
