"""The calls a server is still running, so stopping it can wait for their cleanup.

grpc.aio's `server.stop(grace)` cancels the calls still open when the grace ends and
returns without waiting for their handlers to unwind. A handler unwinding after that
may still be giving a database connection back; disposing of the pool under it leaves
that connection open and unowned. The server's stop waits here first.

A call counts until its handler's cleanup has run, in whichever task runs it: a
streaming handler that grpc cancelled while it was blocked on a write is closed later,
by asyncio's finalizer of abandoned generators, not in the call's own task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

log = logging.getLogger(__name__)


class InFlight:
    def __init__(self) -> None:
        self._calls: set[asyncio.Future[None]] = set()

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        """Count a call until the block ends."""
        ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._calls.add(ended)
        try:
            yield
        finally:
            self._calls.discard(ended)
            ended.set_result(None)

    async def settle(self, within: float) -> None:
        """Wait up to `within` seconds for every tracked call to end; how many had not
        then is logged."""
        pending = set(self._calls)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=within)
        if pending:
            log.warning("%d call(s) still unwinding %.1f s after the server stopped", len(pending), within)
