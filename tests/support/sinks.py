"""Stream sinks for hub tests: record what a node would receive, optionally stalled
the way HTTP/2 flow control stalls a slow reader."""

from __future__ import annotations

import asyncio
from typing import Any

from controlplane.api.watch.v1 import watch_pb2 as pb


class RecordingSink:
    def __init__(self) -> None:
        self.messages: list[list[pb.WatchEvent]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.writes = 0
        # The call is gone: writes fail, as they do on a cancelled gRPC call.
        self.dead = False

    def block(self) -> None:
        self.gate.clear()

    def unblock(self) -> None:
        self.gate.set()

    async def write(self, payload: bytes) -> None:
        self.writes += 1
        await self.gate.wait()
        if self.dead:
            raise ConnectionError("call ended")
        self.messages.append(list(pb.WatchBundlesResponse.FromString(payload).events))

    @property
    def events(self) -> list[pb.WatchEvent]:
        return [e for message in self.messages for e in message]

    def kinds(self) -> list[str]:
        return [str(e.WhichOneof("event")) for e in self.events]

    def of(self, kind: str) -> list[Any]:
        return [getattr(e, kind) for e in self.events if e.WhichOneof("event") == kind]
