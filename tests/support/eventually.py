from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def eventually(
    check: Callable[[], Awaitable[T]], timeout: float = 10.0, interval: float = 0.05, what: str = "condition"
) -> T:
    """Retry `check` until it returns without raising AssertionError; return its value."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await check()
        except AssertionError as e:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not reached within {timeout}s: {e}") from e
        await asyncio.sleep(interval)


async def settle(turns: int = 20) -> None:
    """Let every ready task run until it blocks: a few turns of the event loop."""
    for _ in range(turns):
        await asyncio.sleep(0)
