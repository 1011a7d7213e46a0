"""Every RPC of the server, found from the service descriptors, callable generically: the
authorization matrix and the fuzz test cover RPCs added later without being edited."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from controlplane.rpc.server import SERVICES


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


async def invoke(
    channel: grpc.aio.Channel,
    rpc: Rpc,
    request: Any,
    metadata: tuple[tuple[str, str], ...] = (),
    timeout: float = 5.0,
) -> grpc.StatusCode:
    """Call `rpc` once; the status it ends with (a stream that keeps going after its first
    message counts as OK: the call was admitted)."""

    def serialize(message: Any) -> bytes:
        return message.SerializeToString()

    deserialize = rpc.response_class.FromString
    try:
        if rpc.client_streaming:

            async def one() -> AsyncIterator[Message]:
                yield request

            if rpc.server_streaming:
                call: Any = channel.stream_stream(rpc.path, serialize, deserialize)(
                    one(), metadata=metadata, timeout=timeout
                )
                return await _first(call)
            await channel.stream_unary(rpc.path, serialize, deserialize)(
                one(), metadata=metadata, timeout=timeout
            )
        elif rpc.server_streaming:
            call = channel.unary_stream(rpc.path, serialize, deserialize)(
                request, metadata=metadata, timeout=timeout
            )
            return await _first(call)
        else:
            await channel.unary_unary(rpc.path, serialize, deserialize)(
                request, metadata=metadata, timeout=timeout
            )
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


async def _first(call: Any) -> grpc.StatusCode:
    try:
        reply = await asyncio.wait_for(call.read(), 3.0)
    except TimeoutError:
        call.cancel()
        return grpc.StatusCode.OK  # admitted, waiting for something to happen
    if reply is grpc.aio.EOF:
        return await call.code()
    call.cancel()
    return grpc.StatusCode.OK
