"""One guarded HTTP client session for every outbound call (metric queries, webhooks).

Redirects are never followed (a redirect is an answer, and the caller judges it: a
receiver cannot bounce us into the internal network), answers are read up to a limit,
and a literal forbidden address is refused before connecting (aiohttp does not ask the
resolver about literal addresses; names go through `guard.GuardedResolver`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp

from controlplane.domain.kernel.addresses import Network, literal_reason
from controlplane.outbound.guard import ForbiddenAddress, connector_args

# Answers are read up to this: a gate's yes or a query's value is small, and a receiver
# answering with megabytes must not cost memory.
MAX_ANSWER_BYTES = 1 << 20


class OutboundError(Exception):
    """An outbound call that got no usable answer; the message says why."""


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes
    headers: Mapping[str, str]


class OutboundHttp:
    def __init__(self, allow: Sequence[Network] = ()):
        self.allow = tuple(allow)
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=64, **connector_args(self.allow))
            self._session = aiohttp.ClientSession(connector=connector, trust_env=False)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self,
        method: str,
        url: str,
        within: float,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> Answer:
        host = urlsplit(url).hostname or ""
        reason = literal_reason(host, self.allow)
        if reason:
            raise OutboundError(f"refused to connect: {reason}")
        try:
            async with asyncio.timeout(within):
                async with self._client().request(
                    method, url, data=body, headers=headers, params=params, allow_redirects=False
                ) as response:
                    data = await _bounded(response)
                    if len(data) > MAX_ANSWER_BYTES:
                        raise OutboundError(
                            f"HTTP {response.status} with an answer over {MAX_ANSWER_BYTES} bytes"
                        )
                    return Answer(response.status, data, dict(response.headers))
        except TimeoutError:
            raise OutboundError(f"no answer within {within:g}s") from None
        except ForbiddenAddress as e:
            raise OutboundError(f"refused to connect: {e}") from None
        except aiohttp.ClientConnectorError as e:
            cause = e.os_error if isinstance(e.os_error, ForbiddenAddress) else None
            if cause is not None:
                raise OutboundError(f"refused to connect: {cause}") from None
            raise OutboundError(f"cannot connect: {e.os_error or e}") from None
        except aiohttp.ClientError as e:
            raise OutboundError(f"{type(e).__name__}: {e}"[:300]) from None


async def _bounded(response: aiohttp.ClientResponse) -> bytes:
    """The answer's body, or its first MAX_ANSWER_BYTES + 1 bytes (`read(n)` returns what
    is buffered, not n bytes)."""
    parts: list[bytes] = []
    size = 0
    while size <= MAX_ANSWER_BYTES:
        chunk = await response.content.read(MAX_ANSWER_BYTES + 1 - size)
        if not chunk:
            break
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts)
