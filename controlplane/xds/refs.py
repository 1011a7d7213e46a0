"""What an Envoy resource refers to, and what it must not carry.

A listener's HTTP connection manager fetches its route configuration over ADS by name;
a route sends traffic to clusters; an EDS cluster fetches its endpoints by name; TLS
contexts fetch secrets by name; an aggregate cluster uses other clusters; an internal
address points at a listener. Each is an `Edge` from the resource, with the field path
it came from, so a missing target is reported where it is named.

A bundle is content-addressed, listed and diffed, so it must carry no private key: an
inline key (or a PEM private key block anywhere) is refused. TLS material reaches Envoy
as SDS references to files on the Envoy host.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message

from controlplane.xds import catalog, types

PEM_PRIVATE_KEY = b"PRIVATE KEY-----"
# DataSource fields that hold key material when inline.
_SECRET_FIELDS = frozenset({"private_key", "pkcs12", "password", "secret", "keys"})
_DATA_SOURCE = "envoy.config.core.v3.DataSource"


@dataclass(frozen=True, slots=True)
class Edge:
    type_url: str
    name: str
    # Where in the resource it is named (`filter_chains[0]...rds.route_config_name`).
    path: str
    # Fetched over ADS by name (routes, endpoints, secrets), rather than only used.
    fetched: bool


@dataclass(frozen=True, slots=True)
class Facts:
    edges: tuple[Edge, ...]
    # `path: problem` lines: unsupported features, key material.
    problems: tuple[str, ...]


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def walk(message: Message, path: str = "") -> Iterator[tuple[Message, str, str]]:
    """Every message inside `message` (Anys unpacked) as (message, path, field name)."""
    stack: list[tuple[Message, str, str]] = [(message, path, "")]
    while stack:
        msg, where, field = stack.pop()
        if msg.DESCRIPTOR.full_name == "google.protobuf.Any":
            packed: Any = msg
            cls = catalog.message_class(packed.type_url.rsplit("/", 1)[-1])
            if cls is None:
                continue
            inner = cls()
            inner.ParseFromString(packed.value)
            stack.append((inner, where, field))
            continue
        yield msg, where, field
        children: list[tuple[Message, str, str]] = []
        for fd, value in msg.ListFields():
            if fd.message_type is None:
                continue
            name = _join(where, fd.name)
            if fd.message_type.GetOptions().map_entry:
                if fd.message_type.fields_by_name["value"].message_type is not None:
                    children.extend((value[k], f"{name}[{k!r}]", fd.name) for k in sorted(value))
            elif fd.is_repeated:
                children.extend((item, f"{name}[{i}]", fd.name) for i, item in enumerate(value))
            else:
                children.append((value, name, fd.name))
        stack.extend(reversed(children))


def _is_ads(config_source: Any) -> bool:
    """A ConfigSource served by this ADS stream: `ads: {}` (or `self` under it)."""
    return config_source.WhichOneof("config_source_specifier") in ("ads", "self")


def facts(rtype: types.ResourceType, message: Message) -> Facts:
    edges: list[Edge] = []
    problems: list[str] = []
    cluster_url, listener_url = types.CLUSTER.url, types.LISTENER.url

    def used(name: str, path: str, url: str = cluster_url) -> None:
        if name:
            edges.append(Edge(url, name, path, fetched=False))

    for msg, path, field in walk(message):
        kind = msg.DESCRIPTOR.full_name
        m: Any = msg
        if kind == "envoy.extensions.filters.network.http_connection_manager.v3.Rds":
            if _is_ads(m.config_source):
                edges.append(
                    Edge(types.ROUTE.url, m.route_config_name, _join(path, "route_config_name"), True)
                )
        elif kind == "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager":
            if m.HasField("scoped_routes"):
                problems.append(f"{_join(path, 'scoped_routes')}: scoped routes (SRDS) are not served")
        elif kind == "envoy.config.route.v3.RouteConfiguration":
            if m.HasField("vhds"):
                problems.append(f"{_join(path, 'vhds')}: virtual host discovery (VHDS) is not served")
        elif kind == "envoy.config.route.v3.RouteAction":
            used(m.cluster, _join(path, "cluster"))
            for i, wc in enumerate(m.weighted_clusters.clusters):
                used(wc.name, _join(path, f"weighted_clusters.clusters[{i}].name"))
            for i, mirror in enumerate(m.request_mirror_policies):
                used(mirror.cluster, _join(path, f"request_mirror_policies[{i}].cluster"))
        elif kind == "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy":
            used(m.cluster, _join(path, "cluster"))
            for i, wc in enumerate(m.weighted_clusters.clusters):
                used(wc.name, _join(path, f"weighted_clusters.clusters[{i}].name"))
        elif kind == "envoy.extensions.clusters.aggregate.v3.ClusterConfig":
            for i, name in enumerate(m.clusters):
                used(name, _join(path, f"clusters[{i}]"))
        elif kind == "envoy.config.core.v3.EnvoyInternalAddress":
            used(m.server_listener_name, _join(path, "server_listener_name"), listener_url)
        elif kind == "envoy.extensions.transport_sockets.tls.v3.SdsSecretConfig":
            if m.HasField("sds_config") and _is_ads(m.sds_config):
                edges.append(Edge(types.SECRET.url, m.name, _join(path, "name"), True))
        elif kind == _DATA_SOURCE:
            problems.extend(_key_material(m, path, field))
        if kind == "envoy.config.cluster.v3.Cluster" and not path:
            edge = _eds(m)
            if edge is not None:
                edges.append(edge)
    return Facts(tuple(edges), tuple(problems))


def _eds(c: Any) -> Edge | None:
    if c.WhichOneof("cluster_discovery_type") != "type":
        return None
    if c.type != c.EDS:
        return None
    config = c.eds_cluster_config
    if not config.HasField("eds_config") or not _is_ads(config.eds_config):
        return None
    name = config.service_name or c.name
    where = "eds_cluster_config.service_name" if config.service_name else "name"
    return Edge(types.ENDPOINT.url, name, where, True)


def _key_material(s: Any, path: str, field: str) -> list[str]:
    which = s.WhichOneof("specifier")
    if which not in ("inline_bytes", "inline_string"):
        return []
    data = s.inline_bytes if which == "inline_bytes" else s.inline_string.encode()
    if field in _SECRET_FIELDS or PEM_PRIVATE_KEY in data:
        return [
            f"{_join(path, which)}: holds key material inline; bundles carry no private keys or "
            "secrets (refer to a file on the Envoy host: `filename`, or SDS)"
        ]
    return []
