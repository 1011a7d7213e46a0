"""Every RPC of the server, found from the service descriptors, callable generically: the
authorization matrix checks every RPC has its case, and the fuzz test covers RPCs added
later without being edited."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from controlplane.rpc.server import SERVICES
from tests.support.refusals import lost_by_the_client

# A client stream the server refuses early (a bad header, a rate limit) can come back with
# the status grpcio's asyncio client makes up when a write fails after the server answered
# (refusals.lost_by_the_client), about 1 call in 100 to 400 on two busy cores. That attempt
# is a refusal that changed nothing, and the call is made again, so that what a test
# judges is the server's own answer. Three in a row is a failure like any other.
ATTEMPTS_FOR_A_LOST_STATUS = 3


@dataclass(frozen=True)
class Rpc:
    path: str
    descriptor: MethodDescriptor

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[1]

    @property
    def request_class(self) -> type[Message]:
        return GetMessageClass(self.descriptor.input_type)

    @property
    def response_class(self) -> type[Message]:
        return GetMessageClass(self.descriptor.output_type)

    @property
    def client_streaming(self) -> bool:
        return bool(self.descriptor.client_streaming)

    @property
    def server_streaming(self) -> bool:
        return bool(self.descriptor.server_streaming)


def all_rpcs() -> list[Rpc]:
    pool = descriptor_pool.Default()
    found = []
    for service in SERVICES:
        for method in pool.FindServiceByName(service).methods:
            found.append(Rpc(f"/{service}/{method.name}", method))
    return found


@dataclass(frozen=True)
class Answer:
    """How a call ended: its status, and what it returned (the response, or a stream's
    first message; None when it failed or a stream ended without one)."""

    code: grpc.StatusCode
    details: str = ""
    reply: Any = None
    trailing: tuple[tuple[str, str], ...] = ()


def _start(
    channel: grpc.aio.Channel,
    rpc: Rpc,
    requests: Sequence[Any],
    metadata: tuple[tuple[str, str], ...],
    timeout: float,
) -> Any:
    """Start `rpc`: a client stream sends every message of `requests`, others the first."""

    def serialize(message: Any) -> bytes:
        return message.SerializeToString()

    kind = (
        ("stream" if rpc.client_streaming else "unary")
        + "_"
        + ("stream" if rpc.server_streaming else "unary")
    )
    multicallable = getattr(channel, kind)(rpc.path, serialize, rpc.response_class.FromString)
    if not rpc.client_streaming:
        return multicallable(requests[0], metadata=metadata, timeout=timeout)

    async def each() -> AsyncIterator[Any]:
        for request in requests:
            yield request

    return multicallable(each(), metadata=metadata, timeout=timeout)


async def answer(
    channel: grpc.aio.Channel,
    rpc: Rpc,
    request: Any,
    metadata: tuple[tuple[str, str], ...] = (),
    timeout: float = 10.0,
) -> Answer:
    """Call `rpc` strictly: OK only with the response, or a stream's first message, in
    hand. `request` is one message, or a list of them for a client stream."""
    call = _start(channel, rpc, _messages(request), metadata, timeout)
    try:
        if rpc.server_streaming:
            reply = await call.read()
            if reply is grpc.aio.EOF:
                return Answer(await call.code(), await call.details() or "")
            call.cancel()
            return Answer(grpc.StatusCode.OK, reply=reply)
        return Answer(grpc.StatusCode.OK, reply=await call)
    except grpc.aio.AioRpcError as e:
        trailing = tuple((k, str(v)) for k, v in (e.trailing_metadata() or ()))
        return Answer(e.code(), e.details() or "", trailing=trailing)


def _messages(request: Any) -> list[Any]:
    return list(request) if isinstance(request, list | tuple) else [request]


async def unless_lost(rpc: Rpc, call: Callable[[], Awaitable[Answer]]) -> Answer:
    """`call()`'s answer; made again, up to ATTEMPTS_FOR_A_LOST_STATUS times in all, while
    it is a client stream's status lost by the client. A unary call is made once."""
    for _ in range(ATTEMPTS_FOR_A_LOST_STATUS - 1):
        got = await call()
        if not (rpc.client_streaming and lost_by_the_client(got.code, got.details, got.trailing)):
            return got
    return await call()
