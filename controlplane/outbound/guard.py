"""Where the control plane may connect: the check against server-side request forgery.

A URL is checked twice. At creation, a literal IP address in a forbidden range is refused
(INVALID_ARGUMENT naming the field). At connection time every address a name resolves to
is checked, and the connection goes to a checked address: a name that resolved to a
public address when it was created and to 169.254.169.254 now (DNS rebinding) is refused
then. Forbidden by default: loopback, link-local (which holds the cloud metadata
services), unspecified, multicast and reserved addresses, and the IPv6 forms of them
(IPv4-mapped ones are judged as IPv4). Private ranges are allowed: a webhook receiver or
Prometheus inside the operator's network is the normal case. `allow` (CIDR networks,
from `--outbound-allow`) lifts the refusal for the networks it names, e.g. `127.0.0.0/8`
in tests.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from typing import Any

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ForbiddenAddress(OSError):
    """A target resolved only to addresses the control plane may not connect to."""


def parse_allow(items: Sequence[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(item.strip(), strict=False) for item in items if item.strip())


def forbidden_reason(address: Address, allow: Sequence[Network]) -> str:
    """Why the control plane may not connect to `address` ("" if it may)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if any(address in net for net in allow if net.version == address.version):
        return ""
    for test, what in (
        (address.is_loopback, "loopback"),
        (address.is_link_local, "link-local (cloud metadata services live there)"),
        (address.is_unspecified, "unspecified"),
        (address.is_multicast, "multicast"),
        (address.is_reserved, "reserved"),
    ):
        if test:
            return f"{address} is a {what} address"
    return ""


def literal_reason(host: str, allow: Sequence[Network]) -> str:
    """For a URL's host at creation: the refusal if it is a forbidden literal address
    (or `localhost`); names are checked when connecting."""
    if host.lower().rstrip(".") in ("localhost", "localhost.localdomain"):
        host = "127.0.0.1"
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return ""
    return forbidden_reason(address, allow)


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
