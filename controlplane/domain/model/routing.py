"""Routers: nodes that route a selector's traffic, and the routing tables the control
plane computes for them (domain/routing/).

A routing table is the desired state of a router: each backend of its selector with the
address it registered and its weight. It travels as the row of the router's own
`route:<id>` key in the desired-state log, like any other change.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

# HAProxy's weight range (`set server … weight`); 0 takes no new requests.
MAX_WEIGHT = 256


@dataclass(frozen=True, slots=True)
class Router:
    """An operator's declaration: `node_id` routes to the nodes of `selector`, through the
    backend section `backend` of its own configuration."""

    node_id: str
    project: str
    selector: str
    backend: str
    created_by: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class RoutedBackend:
    node_id: str
    address: str
    weight: int


@dataclass(frozen=True, slots=True)
class RouteTable:
    """What a router should route, as computed at one revision."""

    selector: str
    backend: str
    backends: tuple[RoutedBackend, ...]
    # Nodes of the selector without an address: no traffic reaches them through it.
    unrouted: tuple[str, ...] = ()
    # Why the weights are what they are (the rollouts that set them), for operators.
    reason: str = ""

    def same_routing(self, other: RouteTable | None) -> bool:
        """Whether `other` routes exactly the same (the reason may differ): writing a new
        revision for it would only make the router do nothing."""
        return other is not None and (self.selector, self.backend, self.backends) == (
            other.selector,
            other.backend,
            other.backends,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "selector": self.selector,
            "backend": self.backend,
            "backends": [[b.node_id, b.address, b.weight] for b in self.backends],
            "unrouted": list(self.unrouted),
            "reason": self.reason,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RouteTable:
        return cls(
            selector=str(data["selector"]),
            backend=str(data["backend"]),
            backends=tuple(RoutedBackend(str(n), str(a), int(w)) for n, a, w in data["backends"]),
            unrouted=tuple(str(n) for n in data.get("unrouted", ())),
            reason=str(data.get("reason", "")),
        )
