"""Group commit: many callers' small writes share one transaction.

Every node heartbeats every ~10 s and reports twice per change it applies; at 10,000 nodes
that is ~1,000 heartbeats a second and 20,000 reports after a fleet-wide change. One
transaction each costs several milliseconds of server CPU, most of it per transaction
rather than per row. Here a caller's item joins the batch being formed and the call
returns when that batch has committed; while one batch is being written, the next gathers
whatever arrives. A lone item is written at once (no added latency); under load, batches
grow with the load. Each caller gets its own item's outcome: a result, or the domain error
that item alone earned. An error that fails the transaction fails every item in it.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from controlplane.domain.audit.context import Actor, current_actor, current_request_id
from controlplane.domain.kernel.errors import Unavailable

# Items per transaction at most; more wait for the next.
MAX_BATCH = 500

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class Submitted(Generic[T]):
    item: T
    # Who submitted it: audit entries written for it are theirs, not the batch's.
    actor: Actor
    request_id: str


# Commits one batch; returns one outcome per item, in order: a result or an exception.
Commit = Callable[[list[Submitted[T]]], Awaitable[list["R | Exception"]]]


class GroupCommit(Generic[T, R]):
    def __init__(self, commit: Commit[T, R], name: str, max_batch: int = MAX_BATCH):
        self._commit = commit
        self._name = name
        self._max_batch = max_batch
        self._pending: list[tuple[Submitted[T], asyncio.Future[R]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        """Commit `item` with whatever else is pending; its outcome once committed."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[R] = loop.create_future()
        self._pending.append((Submitted(item, current_actor(), current_request_id()), done))
        if self._writer is None:
            # A context of its own: the writer serves every caller, so it must not carry
            # the first one's log ids or trace (each item keeps its own actor above).
            self._writer = loop.create_task(self._drain(), name=self._name, context=contextvars.Context())
        return await done

    async def settle(self) -> None:
        """Return once no batch is being written. A caller that went away (cancelled)
        leaves its batch committing; a shutdown waits here, after the calls have ended,
        before the database goes."""
        while self._writer is not None:
            await asyncio.wait({self._writer})

    async def _drain(self) -> None:
        batch: list[tuple[Submitted[T], asyncio.Future[R]]] = []
        try:
            while self._pending:
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                try:
                    outcomes = await self._commit([submitted for submitted, _ in batch])
                except Exception as exc:  # the transaction failed: every caller hears why
                    _fail(batch, exc)
                    continue
                for (_, done), outcome in zip(batch, outcomes, strict=True):
                    if done.done():  # the caller went away; its item is committed anyway
                        continue
                    if isinstance(outcome, Exception):
                        done.set_exception(outcome)
                    else:
                        done.set_result(outcome)
        except BaseException as exc:
            # Cancelled (only at shutdown), or something no caller's item earned (a commit
            # answering the wrong number of outcomes): nobody may be left waiting.
            cancelled = isinstance(exc, asyncio.CancelledError)
            why = "the server is shutting down" if cancelled else f"the batch failed: {type(exc).__name__}"
            _fail([*batch, *self._pending], Unavailable(why))
            self._pending.clear()
            raise
        finally:
            self._writer = None


def _fail(batch: list[tuple[Submitted[T], asyncio.Future[R]]], exc: Exception) -> None:
    for _, done in batch:
        if not done.done():
            done.set_exception(exc)
