"""Where the control plane may connect: the check against server-side request forgery.

A URL is checked twice. At creation, a literal IP address in a forbidden range is refused
(INVALID_ARGUMENT naming the field). At connection time every address a name resolves to
is checked, and the connection goes to a checked address: a name that resolved to a
public address when it was created and to 169.254.169.254 now (DNS rebinding) is refused
then. The rule itself (what is forbidden, what `--outbound-allow` lifts) is
`domain/kernel/addresses.py`.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from typing import Any

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from controlplane.domain.kernel.addresses import Network, forbidden_reason


class ForbiddenAddress(OSError):
    """A target resolved only to addresses the control plane may not connect to."""


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver, keeping only the addresses the control plane may reach."""

    def __init__(self, allow: Sequence[Network]):
        self._inner = DefaultResolver()
        self._allow = tuple(allow)

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        kept: list[ResolveResult] = []
        reasons: list[str] = []
        for entry in found:
            reason = forbidden_reason(ipaddress.ip_address(entry["host"]), self._allow)
            if reason:
                reasons.append(reason)
            else:
                kept.append(entry)
        if not kept:
            raise ForbiddenAddress(f"{host} resolves only to forbidden addresses: {'; '.join(reasons[:3])}")
        return kept

    async def close(self) -> None:
        await self._inner.close()


def connector_args(allow: Sequence[Network]) -> dict[str, Any]:
    return {"resolver": GuardedResolver(allow), "use_dns_cache": False}
