"""The xDS resource types a bundle can carry and the ADS stream serves.

Clusters, endpoints and secrets are what listeners and routes use, so they are made
first and broken last (Envoy's xDS protocol, "eventual consistency considerations").
Listener and Cluster are the "full state" types: a state-of-the-world response carries
all of them, and a resource left out is removed. The others are fetched by name and
only change by name.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from google.protobuf.message import Message

PREFIX = "type.googleapis.com/"


class Kind(enum.StrEnum):
    CLUSTER = "cluster"
    ENDPOINT = "endpoint"
    SECRET = "secret"
    LISTENER = "listener"
    ROUTE = "route"


@dataclass(frozen=True, slots=True)
class ResourceType:
    kind: Kind
    url: str
    message: type[Message]
    # The field holding a resource's name (a ClusterLoadAssignment is named by its
    # cluster_name).
    name_field: str
    # Listener and Cluster: every state-of-the-world response carries all of them.
    full_state: bool
    # Two letters for nonces and logs.
    code: str

    @property
    def noun(self) -> str:
        return self.message.DESCRIPTOR.name


def _t(kind: Kind, message: type[Message], name_field: str, full_state: bool, code: str) -> ResourceType:
    return ResourceType(kind, PREFIX + message.DESCRIPTOR.full_name, message, name_field, full_state, code)


CLUSTER = _t(Kind.CLUSTER, cluster_pb2.Cluster, "name", True, "cd")
ENDPOINT = _t(Kind.ENDPOINT, endpoint_pb2.ClusterLoadAssignment, "cluster_name", False, "ed")
SECRET = _t(Kind.SECRET, secret_pb2.Secret, "name", False, "sd")
LISTENER = _t(Kind.LISTENER, listener_pb2.Listener, "name", True, "ld")
ROUTE = _t(Kind.ROUTE, route_pb2.RouteConfiguration, "name", False, "rd")

# Make-before-break order: what is used before what uses it.
ORDER: tuple[ResourceType, ...] = (CLUSTER, ENDPOINT, SECRET, LISTENER, ROUTE)
BY_URL: dict[str, ResourceType] = {t.url: t for t in ORDER}
BY_KIND: dict[Kind, ResourceType] = {t.kind: t for t in ORDER}


def short(url: str) -> str:
    """`Cluster` for Envoy's Cluster type URL: for messages and logs."""
    return url.rsplit(".", 1)[-1]
