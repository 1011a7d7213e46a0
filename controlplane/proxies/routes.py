"""Routing tables as a router's driver applies them, whatever its proxy.

Shared by the server (which checks the address a node registers) and the agent (which
checks its own `--address`, and turns a routing table into the changes its proxy
needs): one rule for what a backend address is, and one diff from what the proxy runs
to what it should.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from controlplane.proxies.http import Address

MAX_ADDRESS = 300
_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
# The server names a driver gives its backends: a prefix marks them as the driver's, so
# servers the router's own configuration declares are never touched.
SERVER_PREFIX = "cp-"
_SERVER_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")


def backend_address(text: str) -> Address:
    """A node's address for routers: `host:port` with an IP address (IPv6 in brackets) or
    a DNS name, port 1-65535; ValueError saying what is wrong."""
    if len(text) > MAX_ADDRESS:
        raise ValueError(f"at most {MAX_ADDRESS} characters")
    address = Address.parse(text)
    host = address.host
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if ":" in host or len(host) > 253 or not all(_LABEL.match(p) for p in host.rstrip(".").split(".")):
            raise ValueError(f"{text!r}: {host!r} is neither an IP address nor a DNS name") from None
        return address
    if ip.is_unspecified or ip.is_multicast:
        raise ValueError(f"{text!r}: {host} is not an address a router can send requests to")
    if ip.version == 6 and not text.startswith("["):
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, [{host}]:{address.port}")
    return address


def server_name(node_id: str) -> str:
    """The server a driver adds for a backend node."""
    name = SERVER_PREFIX + node_id
    if not _SERVER_NAME.match(name):
        raise ValueError(f"node id {node_id!r} cannot name a server")
    return name


@dataclass(frozen=True)
class Server:
    """A server of the router's backend, as the proxy runs it (or should)."""

    name: str
    address: Address
    weight: int


@dataclass(frozen=True)
class Changes:
    """What turns the servers the proxy runs into those the table wants."""

    add: tuple[Server, ...]
    # The address changed: the server is set to the new one (and weight) in place.
    move: tuple[Server, ...]
    reweight: tuple[Server, ...]
    remove: tuple[str, ...]

    @property
    def empty(self) -> bool:
        return not (self.add or self.move or self.reweight or self.remove)


def wanted(backends: Iterable[tuple[str, str, int]]) -> dict[str, Server]:
    """Servers for (node id, address, weight) backends; ValueError on a bad entry."""
    out: dict[str, Server] = {}
    for node_id, address, weight in backends:
        name = server_name(node_id)
        out[name] = Server(name, backend_address(address), weight)
    return out


def diff(running: Mapping[str, Server], want: Mapping[str, Server]) -> Changes:
    """Only the driver's own servers (`SERVER_PREFIX`) of `running` are considered."""
    mine = {name: s for name, s in running.items() if name.startswith(SERVER_PREFIX)}
    add = tuple(s for name, s in sorted(want.items()) if name not in mine)
    move = tuple(s for name, s in sorted(want.items()) if name in mine and mine[name].address != s.address)
    reweight = tuple(
        s
        for name, s in sorted(want.items())
        if name in mine and mine[name].address == s.address and mine[name].weight != s.weight
    )
    remove = tuple(sorted(name for name in mine if name not in want))
    return Changes(add, move, reweight, remove)


@dataclass(frozen=True)
class Table:
    """A router's routing table as its driver applies it: the backend section whose
    servers it manages, and the servers it wants there."""

    revision: int
    backend: str
    servers: Mapping[str, Server]

    def to_json(self) -> dict[str, object]:
        return {
            "revision": self.revision,
            "backend": self.backend,
            "servers": [[s.name, str(s.address), s.weight] for s in self.servers.values()],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> Table:
        servers = data["servers"]
        assert isinstance(servers, list)
        return cls(
            int(str(data["revision"])),
            str(data["backend"]),
            {str(n): Server(str(n), Address.parse(str(a)), int(w)) for n, a, w in servers},
        )


def table(revision: int, backend: str, backends: Iterable[tuple[str, str, int]]) -> Table:
    """A table from the control plane's (node id, address, weight) backends; ValueError
    naming a bad entry."""
    if not _SERVER_NAME.match(backend):
        raise ValueError(f"backend name {backend!r} is not one a proxy takes")
    for _, _, weight in backends:
        if not 0 <= weight <= 256:
            raise ValueError(f"weight {weight} is outside 0-256")
    return Table(revision, backend, wanted(backends))
