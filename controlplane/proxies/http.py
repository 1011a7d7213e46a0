"""A bounded HTTP GET for loopback status endpoints and admin APIs.

The standard library's `http.client` (chunked answers, as Envoy's admin sends, included)
in a worker thread, bounded in time and size: a proxy that hangs or answers without end
costs at most `seconds` and `limit` bytes. A connection per request keeps no state
between heartbeats.
"""

from __future__ import annotations

import asyncio
import http.client
from dataclasses import dataclass

DEFAULT_LIMIT = 4 * 1024 * 1024


class HttpError(Exception):
    """The endpoint did not answer, or not with HTTP."""


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> Address:
        """`host:port` (IPv6 as `[::1]:port`); ValueError naming what is wrong."""
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{text!r} is not host:port")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{text!r}: the port must be a number from 1 to 65535")
        return cls(host, int(port))


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")


async def get(address: Address, path: str, seconds: float = 2.0, limit: int = DEFAULT_LIMIT) -> Response:
    return await asyncio.to_thread(get_sync, address, path, seconds, limit)


def get_sync(address: Address, path: str, seconds: float = 2.0, limit: int = DEFAULT_LIMIT) -> Response:
    url = f"http://{address}{path}"
    conn = http.client.HTTPConnection(address.host, address.port, timeout=seconds)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        response = conn.getresponse()
        body = response.read(limit + 1)
        if len(body) > limit:
            raise HttpError(f"{url} answered more than {limit} bytes")
        # read(n) returns what came before an early close without a word: say it.
        if response.length:
            raise HttpError(f"{url}: the answer was cut off {response.length} bytes short")
    except TimeoutError:
        raise HttpError(f"{url} did not answer within {seconds:g}s") from None
    except (OSError, http.client.HTTPException) as e:
        raise HttpError(f"{url}: {getattr(e, 'strerror', None) or e!r}") from None
    finally:
        conn.close()
    return Response(response.status, body)
