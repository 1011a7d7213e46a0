from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

log = logging.getLogger(__name__)


class Periodic:
    """Run `job` every `interval` seconds (±10% jitter) until stopped; a failing run is
    logged and retried next time, never fatal."""

    def __init__(self, name: str, interval: float, job: Callable[[], Awaitable[object]]):
        self.name = name
        self.interval = interval
        self.job = job
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval * random.uniform(0.9, 1.1))
            try:
                await self.job()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("%s failed", self.name, exc_info=True)


class Loop:
    """A job that runs its own loop (it waits for its own wake-ups): started and stopped
    with the periodic jobs."""

    def __init__(self, name: str, job: Callable[[], Coroutine[Any, Any, None]]):
        self.name = name
        self.job = job
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.job(), name=self.name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
