"""Asserting that a call is refused with a status, and what its message says."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import grpc
import pytest


async def expect(code: grpc.StatusCode, call: Awaitable[Any], mentions: str = "") -> str:
    """`call` fails with `code` and a message containing `mentions`; the message."""
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await call
    assert e.value.code() == code, f"{e.value.code()}: {e.value.details()}"
    details = e.value.details() or ""
    assert mentions in details, details
    return details
