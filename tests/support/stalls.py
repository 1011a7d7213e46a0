"""What a teardown that takes far too long was waiting for.

A stop that normally takes a second has twice taken 120 s in CI, on a worker's last
test, and never alone. `watched` (a coroutine) and `watched_sync` (a block) print, into the phase's
captured output, the stacks of every asyncio task and thread once the block has run for
`after` seconds; tests/conftest.py's `pytest_terminal_summary` shows the captured output
of every teardown slower than SLOW_TEARDOWN at the end of the run (xdist sends each
report's captured sections to the controller), so the next stall names its cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import sys
import threading
import traceback
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

SLOW_TEARDOWN = 20.0


def stacks(loop: asyncio.AbstractEventLoop | None = None) -> str:
    """Every thread's stack, and every task's of `loop` (if given)."""
    out = io.StringIO()
    names = {t.ident: t.name for t in threading.enumerate()}
    for ident, frame in sys._current_frames().items():
        out.write(f"--- thread {names.get(ident, ident)}\n")
        out.write("".join(traceback.format_stack(frame)))
    if loop is not None:
        for task in asyncio.all_tasks(loop):
            out.write(f"--- {task!r}\n")
            out.writelines(f"  {line}\n" for line in _awaiting(task.get_coro()))
    return out.getvalue()


def _awaiting(coro: object) -> list[str]:
    """The chain of awaits from a task's coroutine down to what it waits on (a task's own
    stack shows its outermost frame only)."""
    lines: list[str] = []
    while coro is not None and len(lines) < 100:
        frame = _first(coro, "cr_frame", "gi_frame", "ag_frame")
        if frame is not None:
            lines.append(f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}")
        awaited = _first(coro, "cr_await", "gi_yieldfrom", "ag_await")
        if frame is not None and frame.f_code.co_name in ("__aenter__", "__aexit__"):
            # An @asynccontextmanager awaits its generator through an `asend` object
            # that names nothing: go on from the generator itself.
            awaited = getattr(frame.f_locals.get("self"), "gen", None) or awaited
        coro = awaited
    return lines


def _report(what: str, after: float, loop: asyncio.AbstractEventLoop | None) -> None:
    print(f"STALL: {what} still running after {after:.0f} s; what it waits for:\n{stacks(loop)}", flush=True)


async def watched(what: str, work: Coroutine[Any, Any, T], after: float = SLOW_TEARDOWN) -> T:
    """`await work`, run as a task of its own so that its awaits can be walked."""
    loop = asyncio.get_running_loop()
    handle = loop.call_later(after, _report, what, after, loop)
    try:
        return await asyncio.create_task(work)
    finally:
        handle.cancel()


@contextlib.contextmanager
def watched_sync(what: str, after: float = SLOW_TEARDOWN) -> Iterator[None]:
    timer = threading.Timer(after, _report, (what, after, None))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _first(obj: object, *names: str) -> Any:
    """The first of these attributes `obj` has set (coroutines, generators and async
    generators name the same things differently)."""
    for name in names:
        found = getattr(obj, name, None)
        if found is not None:
            return found
    return None
