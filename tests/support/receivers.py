"""Real HTTP receivers for webhook and notification tests: an aiohttp server on a free
loopback port that records every request and answers as the test scripts it."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    def signed_by(self, secret: str) -> bool:
        stamp = self.headers.get("X-Controlplane-Timestamp", "")
        mac = hmac.new(secret.encode(), stamp.encode() + b"." + self.body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(self.headers.get("X-Controlplane-Signature", ""), "sha256=" + mac)


# Answers: an HTTP status, "hang" (never answer), "redirect" (a 302 to itself), or
# "huge" (200 with 10 MB).
Answer = int | str


@dataclass
class Receiver:
    # Answers for the next requests, in order; then `default`.
    script: list[Answer] = field(default_factory=list)
    default: Answer = 200
    received: list[Received] = field(default_factory=list)
    port: int = 0
    _runner: web.AppRunner | None = None
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def start(self) -> Receiver:
        app = web.Application(client_max_size=1 << 20)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # A hanging answer must not hold the stop for aiohttp's default minute.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server: Any = site._server
        self.port = int(server.sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.received.append(Received(request.path, dict(request.headers), await request.read()))
        answer = self.script.pop(0) if self.script else self.default
        if answer == "hang":
            await self._stopping.wait()
        if answer == "redirect":
            raise web.HTTPFound(location=self.url)
        if answer == "huge":
            return web.Response(body=b"x" * (10 << 20))
        assert isinstance(answer, int)
        return web.Response(status=answer, text="ok" if answer < 300 else "no")
