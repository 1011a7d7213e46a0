"""A wake-up that many ring and one loop waits on."""

from __future__ import annotations

import asyncio


class Wakeup:
    """Ringing it while its loop is busy is not lost, and a burst of rings wakes the loop
    once. Made before the loop and the ringers exist, so each takes it in its constructor
    and the composition root shows who wakes whom."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def __call__(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()

    def clear(self) -> None:
        self._event.clear()
