"""What a node's address and a router's backend name may be."""

from __future__ import annotations

import re

from controlplane.domain.kernel.errors import InvalidArgument
from controlplane.proxies.routes import backend_address

# A name HAProxy takes for a backend section; other proxies' names are stricter than none.
_BACKEND = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")


def node_address(text: str, field: str = "address") -> str:
    """A registered address, canonical (`host:port`, IPv6 in brackets); "" stays ""."""
    if not text:
        return ""
    try:
        return str(backend_address(text))
    except ValueError as e:
        raise InvalidArgument(f"{str(e)[:300]} (host:port the node's proxy serves on)", field=field) from None


def backend_name(text: str, field: str = "backend") -> str:
    if not _BACKEND.match(text):
        raise InvalidArgument(
            f"{text[:100]!r}: name the backend section of the router's configuration "
            "(1-100 letters, digits, '_', '.', ':' or '-')",
            field=field,
        )
    return text
