"""The watch loop, modelled on client-go's reflector.

Open WatchBundles from the persisted cursor (a bootstrap when there is none), hand every
response to the EventHandler in order, and when the stream ends reconnect: at once after
a closing bookmark (spread over the time a stopping server names), otherwise after a
full-jitter backoff (see backoff.py). Every read has a liveness deadline, so a stream
that goes quiet, or never delivers its first message because the server is stalled
accepting calls, is cancelled and retried.

A server that cannot be reached at all, or refuses the call because it is shutting
down, is not overloaded: with several addresses (servers.py) the agent moves to the next
one at once, and once every one has been tried it probes on the short fixed cadence of
`Backoff.unreachable` rather than the growing backoff.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from agent_stub.backoff import Backoff, StreamOutcome
from agent_stub.errors import TransientFailure
from agent_stub.events import EventHandler
from agent_stub.identity import Registrar
from agent_stub.logs import EventLog
from agent_stub.rpc import (
    ErrorClass,
    bearer,
    classify,
    code_name,
    error_summary,
    retry_after,
    stopping,
    unreachable,
)
from agent_stub.servers import ServerSet
from controlplane.api.watch.v1 import watch_pb2, watch_pb2_grpc

# After a closing bookmark, how long to wait for the stream's status and trailers (where
# a stopping server says when to come back); the server ends the call right after it.
_CLOSING_TRAILERS = 1.0


@dataclass
class _Run:
    """What happened on one stream, for the backoff decision."""

    opened: float
    first: float | None = None
    messages: int = 0
    closing: bool = False
    code: Any = None
    details: str = ""
    hint: float | None = None
    why: str = ""


class Watcher:
    def __init__(
        self,
        channel: Any,
        registrar: Registrar,
        handler: EventHandler,
        backoff: Backoff,
        log: EventLog,
        liveness_timeout: float = 45.0,
        clock: Callable[[], float] = time.monotonic,
        servers: ServerSet | None = None,
    ):
        self._stub = watch_pb2_grpc.WatchServiceStub(channel)
        self.registrar = registrar
        self.handler = handler
        self.backoff = backoff
        self.log = log
        self.liveness_timeout = liveness_timeout
        self._clock = clock
        self.servers = servers
        # Set once re-registration was tried for an UNAUTHENTICATED; cleared by a
        # stream that delivers a message.
        self._reauth_tried = False
        self.connected = asyncio.Event()
        self.registered = asyncio.Event()

    async def run(self) -> None:
        while True:
            try:
                delay = await self.attempt()
            except Exception as e:
                # A local failure (state dir unwritable, a bug): log it and back off,
                # never crash-loop the process.
                self.log.exception("watch.error", error=repr(e))
                delay = self.backoff.failure()
            if delay > 0:
                self.log.info("reconnect.wait", delay=f"{delay:.2f}", failures=self.backoff.failures)
                await asyncio.sleep(delay)

    async def attempt(self) -> float:
        """Register if needed, run one stream to its end; return the delay before the next."""
        try:
            identity = await self.registrar.ensure()
        except grpc.RpcError as e:
            code = e.code() if callable(getattr(e, "code", None)) else None
            details = e.details() if callable(getattr(e, "details", None)) else ""
            if unreachable(code, details or "") or stopping(code, details or ""):
                self.log.warning("register.failed", error=error_summary(e))
                return self._elsewhere(None)
            self._reached()
            if classify(code) is ErrorClass.RETRY:
                self.log.warning("register.failed", error=error_summary(e))
                return self.backoff.failure()
            self.log.error(
                "register.refused",
                error=error_summary(e),
                detail="check --server, --project and --token; retrying at the backoff cap",
            )
            return self.backoff.at_cap()
        except TimeoutError:
            self.log.warning("register.failed", error="timed out")
            return self.backoff.failure()
        self.registered.set()
        self.handler.adopt(identity.node_id)
        self.log.set(node=identity.node_id)
        return await self._stream(identity.node_id, self.registrar.bearer())

    async def _stream(self, node_id: str, credential: str) -> float:
        cursor = self.handler.cursor
        self.log.set(stream=None)
        self.log.info("stream.open", revision=cursor.revision, epoch=cursor.epoch or None)
        run = _Run(opened=self._clock())
        call = self._stub.WatchBundles(
            watch_pb2.WatchBundlesRequest(
                node_id=node_id, since_revision=cursor.revision, epoch=cursor.epoch
            ),
            metadata=bearer(credential),
        )
        try:
            await self._read(call, run)
        except grpc.RpcError as e:
            run.code = e.code() if callable(getattr(e, "code", None)) else grpc.StatusCode.UNKNOWN
            run.details = (e.details() if callable(getattr(e, "details", None)) else "") or ""
            metadata = e.trailing_metadata() if callable(getattr(e, "trailing_metadata", None)) else None
            run.hint = retry_after(metadata)
            run.why = f"stream failed: {error_summary(e)}"
        except TransientFailure as e:
            run.code = getattr(grpc.StatusCode, e.code, grpc.StatusCode.UNAVAILABLE) if e.code else None
            run.hint = e.retry_after
            run.why = f"abandoning the stream: {e}"
        except Exception as e:
            # A bug or a local failure (state dir unwritable): never crash-loop, back off.
            self.log.exception("stream.error", error=repr(e))
            run.why = f"local error: {e!r}"
        finally:
            call.cancel()
            self.connected.clear()
        ended = self._clock()
        outcome = StreamOutcome(
            duration=ended - run.opened,
            messages=run.messages,
            healthy_for=ended - run.first if run.first is not None else 0.0,
            closing=run.closing,
            retry_after=run.hint,
        )
        return self._delay(outcome, run)

    async def _read(self, call: Any, run: _Run) -> None:
        """Read and handle messages until the stream ends, goes quiet or closes."""
        while True:
            try:
                async with asyncio.timeout(self.liveness_timeout):
                    response = await call.read()
            except TimeoutError:
                run.why = f"no message for {self.liveness_timeout:g}s (liveness deadline)"
                run.code = grpc.StatusCode.DEADLINE_EXCEEDED
                return
            if response is grpc.aio.EOF:
                run.code = await call.code()
                run.details = await call.details() or ""
                run.hint = retry_after(await call.trailing_metadata())
                run.why = f"server ended the stream: {code_name(run.code)}: {run.details}"
                return
            run.messages += 1
            if run.first is None:
                run.first = self._clock()
                self._reauth_tried = False
                self._reached()
                self.connected.set()
            if await self.handler.handle(response):
                run.closing = True
                run.hint = await self._closing_hint(call)
                return

    async def _closing_hint(self, call: Any) -> float | None:
        """A stopping server's `retry-after-ms`, from the trailers that follow a closing
        bookmark (None for a stream merely rotated, or if they do not come promptly)."""
        try:
            async with asyncio.timeout(_CLOSING_TRAILERS):
                while await call.read() is not grpc.aio.EOF:
                    pass
                return retry_after(await call.trailing_metadata())
        except (TimeoutError, grpc.RpcError):
            return None

    def _reached(self) -> None:
        """A call reached a server: the next unreachable spell starts afresh."""
        self.backoff.reachable()
        if self.servers is not None:
            self.servers.reached()

    def _elsewhere(self, hint: float | None) -> float:
        """The server is unreachable or stopping: the next address at once while there
        is one not yet tried, else the probe cadence (at least the server's hint)."""
        if self.servers is not None and self.servers.several:
            target = self.servers.move()
            if not self.servers.round_done:
                self.log.info("server.move", server=target)
                return 0.0
        return max(self.backoff.unreachable(self._clock()), hint or 0.0)

    def _delay(self, outcome: StreamOutcome, run: _Run) -> float:
        code, why = run.code, run.why
        fields: dict[str, object] = {
            "lived": f"{outcome.duration:.2f}",
            "messages": outcome.messages,
            "revision": self.handler.cursor.revision,
        }
        if outcome.closing:
            self.log.info("stream.rotate", **fields)
            if outcome.retry_after is not None and self.servers is not None and self.servers.several:
                # The server is stopping and said so: another replica takes the stream now.
                self.log.info("server.move", server=self.servers.move())
                self.backoff.after_stream(outcome)
                return 0.0
            return self.backoff.after_stream(outcome)
        if outcome.messages == 0 and (unreachable(code, run.details) or stopping(code, run.details)):
            delay = self._elsewhere(outcome.retry_after)
            # Probing a server that is down is expected: one line each, not a warning.
            self.log.info("stream.unreachable", reason=why, delay=f"{delay:.2f}", **fields)
            return delay
        kind = classify(code) if code is not None else ErrorClass.RETRY
        if self.backoff.is_short_lived(outcome):
            fields["short_lived"] = True
        if outcome.retry_after is not None:
            fields["retry_after"] = f"{outcome.retry_after:.2f}"
        if kind is ErrorClass.REAUTH:
            if not self._reauth_tried:
                self._reauth_tried = True
                self.registrar.invalidate()
                self.log.warning("stream.unauthenticated", reason=why, detail="registering again", **fields)
                return self.backoff.after_stream(outcome)
            self._reauth_tried = False
            self.log.error(
                "stream.unauthenticated",
                reason=why,
                detail="refused again after registering; backing off",
                **fields,
            )
            return max(self.backoff.at_cap(), outcome.retry_after or 0.0)
        if kind is ErrorClass.REFUSED:
            self.log.error("stream.refused", reason=why, detail="retrying at the backoff cap", **fields)
            return max(self.backoff.at_cap(), outcome.retry_after or 0.0)
        self.log.warning("stream.ended", reason=why, **fields)
        return self.backoff.after_stream(outcome)
