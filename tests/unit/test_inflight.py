"""InFlight: a stop waits for every call's cleanup, in whichever task it runs."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator

import pytest

from controlplane.rpc.inflight import InFlight


async def test_a_streaming_call_counts_until_its_generator_has_cleaned_up() -> None:
    """grpc cancels the call's task while it is blocked writing what the handler
    yielded; the handler (a generator) is closed later, from another task. A stop must
    wait for that cleanup, not for the call's task, which ended at once."""
    inflight = InFlight()
    cleaned = asyncio.Event()

    async def handler() -> AsyncGenerator[int]:
        with inflight.track():
            try:
                yield 1
                await asyncio.sleep(100)
            finally:
                await asyncio.sleep(0.05)  # giving something back takes a moment
                cleaned.set()

    stream = handler()

    async def call() -> None:
        await anext(stream)
        await asyncio.sleep(100)  # blocked on the write

    task = asyncio.create_task(call())
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    closing = asyncio.create_task(stream.aclose())  # what asyncio's generator finalizer does
    await inflight.settle(5.0)
    assert cleaned.is_set()
    await closing


async def test_a_call_still_unwinding_after_the_wait_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    inflight = InFlight()
    release = asyncio.Event()

    async def call() -> None:
        with inflight.track():
            await release.wait()

    task = asyncio.create_task(call())
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING, logger="controlplane.rpc.inflight"):
        await inflight.settle(0.01)
    assert "1 call(s) still unwinding" in caplog.text
    release.set()
    await task
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="controlplane.rpc.inflight"):
        await inflight.settle(0.01)  # nothing left
    assert caplog.text == ""
