"""Asserting that a call is refused with a status, and what its message says; and telling
a status the server sent from one grpcio's asyncio client made up."""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import Any

import grpc
import pytest

# grpcio's asyncio client (1.85 and before: grpc/grpc#36066, fix proposed in #43486) can
# lose the status of a client-streaming call that the server ended while the client was
# still sending: a write then fails, and `_StreamRequestMixin._write` replaces the status
# already received with INTERNAL and these details (`set_internal_error`; its debug string
# is `Failed "execute_batch": (SendMessageOperation)`). HTTP/2 lets a server answer before
# the request ends (RFC 9113 §8.1), and the synchronous client (the CLI's) reports the
# server's status: nothing in the server to change. No status of ours has these details
# (the server's INTERNAL says "see the server log").
LOST_STATUS_DETAILS = "Internal error from Core"


def lost_by_the_client(code: grpc.StatusCode, details: str, trailing: Sequence[tuple[str, Any]]) -> bool:
    """The status is the one grpcio's asyncio client puts in place of the server's when a
    write fails after the server ended the call: INTERNAL, those details, and no trailing
    metadata (the server's trailers went with its status). Only a client-streaming call
    can show it."""
    return code is grpc.StatusCode.INTERNAL and details == LOST_STATUS_DETAILS and not trailing


async def expect(code: grpc.StatusCode, call: Awaitable[Any], mentions: str = "") -> str:
    """`call` fails with `code` and a message containing `mentions`; the message."""
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await call
    assert e.value.code() == code, f"{e.value.code()}: {e.value.details()}"
    details = e.value.details() or ""
    assert mentions in details, details
    return details
