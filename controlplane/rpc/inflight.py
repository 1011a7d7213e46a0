"""The calls a server is still running, so stopping it can wait for their cleanup.

grpc.aio's `server.stop(grace)` cancels the calls still open when the grace ends and
returns without waiting for their handlers to unwind. A handler unwinding after that
may still be giving a database connection back; disposing of the pool under it leaves
that connection open and unowned. The server's stop waits here first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)


class InFlight:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        """Count the running task as a call until the block ends."""
        task = asyncio.current_task()
        if task is None:  # not inside a task: nothing to wait for
            yield
            return
        self._tasks.add(task)
        try:
            yield
        finally:
            self._tasks.discard(task)

    async def settle(self, within: float) -> None:
        """Wait up to `within` seconds for every tracked call to end; one still running
        then is named in the log."""
        pending = {t for t in self._tasks if t is not asyncio.current_task()}
        if pending:
            _, pending = await asyncio.wait(pending, timeout=within)
        for task in pending:
            log.warning("a call was still unwinding %.1f s after the server stopped: %r", within, task)
