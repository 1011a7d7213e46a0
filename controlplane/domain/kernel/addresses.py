"""Which addresses the control plane may call out to: the rule against server-side
request forgery, pure (the connection-time check in `outbound/guard.py` and the
creation-time checks of webhook and provider URLs share it).

Forbidden by default: loopback, link-local (which holds the cloud metadata services at
169.254.169.254 and fd00:ec2::254's neighbours), unspecified, multicast and reserved
addresses; IPv4-mapped IPv6 addresses are judged as the IPv4 address they carry.
Private ranges are allowed: a receiver or Prometheus inside the operator's network is
the normal case. Networks in `allow` (`--outbound-allow`) are allowed whatever they are.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


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
    """For a URL's host: the refusal if it is a forbidden literal address; names (even
    `localhost`) are checked when connecting, after resolution."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return ""
    return forbidden_reason(address, allow)
