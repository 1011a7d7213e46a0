"""Work in a worker thread that a cancelled caller waits for.

`asyncio.to_thread` hands a cancellation to the caller at once while the thread runs
on: the caller then releases what the work was counted against (a pipeline slot) and
removes what it works in (a scratch tree, which a tar extraction would create again,
member by member). `in_thread` asks the work to stop (`stop`, if given), waits for the
thread to end, and only then lets the cancellation go on.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def in_thread(fn: Callable[..., T], *args: Any, stop: Callable[[], None] | None = None) -> T:
    work = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        if stop is not None:
            stop()
        # Its outcome no longer matters, only that it ended. A second cancellation
        # stops the waiting too.
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.shield(work)
        raise
