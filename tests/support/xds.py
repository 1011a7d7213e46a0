"""xDS test support: resource sets built from a few words, and an xDS client that behaves
the way Envoy does (ACK/NACK, EDS and RDS subscriptions following what it holds,
partial application of a refused update), driven against a session's bytes.

The client is a protocol peer, not a double of our code: the real Envoy tests
(tests/e2e/test_xds_envoy.py) check the same behaviour against Envoy itself.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2, json_format
from google.protobuf.message import Message

from controlplane.xds import refs, types
from controlplane.xds.snapshot import Resource, ResourceSet, Snapshot, canonical
from controlplane.xds.types import CLUSTER, ENDPOINT, LISTENER, ROUTE

# -- building resources -------------------------------------------------------------------


def bundle_files(messages: Iterable[Message], path: str = "edge/site.json") -> dict[str, bytes]:
    """The files of an xDS bundle holding `messages` (Envoy's file-subscription shape)."""
    docs = []
    for message in messages:
        packed = any_pb2.Any()
        packed.Pack(message)
        docs.append(json_format.MessageToDict(packed))
    return {path: json.dumps({"resources": docs}, indent=1).encode()}


def resource(message: Message) -> Resource:
    rtype = types.BY_URL["type.googleapis.com/" + message.DESCRIPTOR.full_name]
    facts = refs.facts(rtype, message)
    name = getattr(message, rtype.name_field)
    return Resource(rtype.url, name, canonical(message), frozenset((e.type_url, e.name) for e in facts.edges))


def cluster(name: str, eds: bool = True, port: int = 9000, timeout: int = 1) -> Message:
    c: Any = cluster_pb2.Cluster(name=name)
    c.connect_timeout.seconds = timeout
    if eds:
        c.type = cluster_pb2.Cluster.EDS
        c.eds_cluster_config.eds_config.ads.SetInParent()
        c.eds_cluster_config.eds_config.resource_api_version = 2  # V3
    else:
        c.type = cluster_pb2.Cluster.STATIC
        c.load_assignment.CopyFrom(endpoints(name, port))
    return c


def endpoints(name: str, port: int = 9000, host: str = "127.0.0.1") -> Message:
    m: Any = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    addr = m.endpoints.add().lb_endpoints.add().endpoint.address.socket_address
    addr.address = host
    addr.port_value = port
    return m


def route(name: str, cluster_name: str, prefix: str = "/", regex: str | None = None) -> Message:
    r: Any = route_pb2.RouteConfiguration(name=name)
    vh = r.virtual_hosts.add(name="all", domains=["*"])
    rt = vh.routes.add()
    if regex is not None:
        rt.match.safe_regex.regex = regex
    else:
        rt.match.prefix = prefix
    rt.route.cluster = cluster_name
    return r


def listener(name: str, route_name: str, port: int = 10000, host: str = "127.0.0.1") -> Message:
    m: Any = listener_pb2.Listener(name=name)
    m.address.socket_address.address = host
    m.address.socket_address.port_value = port
    h: Any = hcm.HttpConnectionManager(stat_prefix=name)
    h.rds.route_config_name = route_name
    h.rds.config_source.ads.SetInParent()
    h.rds.config_source.resource_api_version = 2
    f = h.http_filters.add(name="envoy.filters.http.router")
    f.typed_config.Pack(router_pb2.Router())
    nf = m.filter_chains.add().filters.add(name="envoy.filters.network.http_connection_manager")
    nf.typed_config.Pack(h)
    return m


def web(
    version: str,
    clusters: Iterable[str] = ("backend",),
    route_to: str = "backend",
    listener_port: int = 10000,
    upstream_port: int = 9000,
    listener_name: str = "http",
    route_name: str = "main",
) -> ResourceSet:
    """A listener -> route -> cluster(s) (EDS) -> endpoints set; `version` changes the
    endpoints' port offset so two versions differ in content."""
    offset = int(version.lstrip("v") or 0)
    items = [resource(listener(listener_name, route_name, listener_port))]
    items.append(resource(route(route_name, route_to)))
    for c in clusters:
        items.append(resource(cluster(c)))
        items.append(resource(endpoints(c, upstream_port + offset)))
    return ResourceSet(items)


def snap(revision: int, resources: ResourceSet) -> Snapshot:
    return Snapshot(revision, f"sha256:{resources.digest}", resources)


# -- an Envoy-like client -----------------------------------------------------------------

Reject = Callable[[str, str, bytes], str | None]


@dataclass
class Held:
    version: str
    body: bytes
    refs: frozenset[tuple[str, str]]


@dataclass
class FakeEnvoy:
    """Holds resources by type and name, acks what it accepts, NACKs what `reject` refuses
    (applying the rest of the response, as Envoy does), and subscribes to the endpoints
    and routes its clusters and listeners name."""

    mode: str
    node_id: str = "n1"
    reject: Reject | None = None
    held: dict[str, dict[str, Held]] = field(default_factory=lambda: {t.url: {} for t in types.ORDER})
    versions: dict[str, str] = field(default_factory=dict)
    nonces: dict[str, str] = field(default_factory=dict)
    names: dict[str, set[str]] = field(default_factory=lambda: {ENDPOINT.url: set(), ROUTE.url: set()})
    received: list[tuple[str, list[str], list[str]]] = field(default_factory=list)
    nacks: list[str] = field(default_factory=list)
    _first: bool = True

    def _node(self) -> dict[str, Any]:
        if self._first:
            self._first = False
            return {"node": {"id": self.node_id}}
        return {}

    def opening(self, resume: bool = False) -> list[Message]:
        """The first requests of a stream: CDS and LDS, and on resume every type held."""
        self._first = True
        self.nonces = {}
        out: list[Message] = []
        for rtype in (CLUSTER, ENDPOINT, LISTENER, ROUTE):
            wildcard = rtype.full_state
            if not wildcard and not (resume and self.names[rtype.url]):
                continue
            names = sorted(self.names.get(rtype.url, ()))
            if self.mode == "sotw":
                version = self.versions.get(rtype.url, "") if resume else ""
                out.append(
                    discovery_pb2.DiscoveryRequest(
                        type_url=rtype.url, resource_names=names, version_info=version, **self._node()
                    )
                )
            else:
                initial = {n: h.version for n, h in self.held[rtype.url].items()} if resume else {}
                out.append(
                    discovery_pb2.DeltaDiscoveryRequest(
                        type_url=rtype.url,
                        resource_names_subscribe=names,
                        initial_resource_versions=initial,
                        **self._node(),
                    )
                )
        return out

    def handle(self, payload: bytes) -> list[Message]:
        if self.mode == "sotw":
            return self._sotw(discovery_pb2.DiscoveryResponse.FromString(payload))
        return self._delta(discovery_pb2.DeltaDiscoveryResponse.FromString(payload))

    def _accept(self, url: str, name: str, body: bytes) -> str | None:
        return self.reject(url, name, body) if self.reject is not None else None

    def _hold(self, url: str, name: str, version: str, body: bytes) -> None:
        rtype = types.BY_URL[url]
        message = rtype.message()
        message.ParseFromString(body)
        facts = refs.facts(rtype, message)
        self.held[url][name] = Held(version, body, frozenset((e.type_url, e.name) for e in facts.edges))

    def _sotw(self, resp: Any) -> list[Message]:
        url = resp.type_url
        rtype = types.BY_URL[url]
        names = [a for a in resp.resources]
        self.received.append((url, [self._name(url, a.value) for a in names], []))
        errors: list[str] = []
        incoming: dict[str, bytes] = {}
        for a in names:
            incoming[self._name(url, a.value)] = a.value
        if rtype.full_state:
            for name in list(self.held[url]):
                if name not in incoming:
                    del self.held[url][name]
        for name, body in incoming.items():
            if not rtype.full_state and name not in self.names[url]:
                continue  # not asked for: ignored
            err = self._accept(url, name, body)
            if err:
                errors.append(err)
                continue
            self._hold(url, name, resp.version_info, body)
        self.nonces[url] = resp.nonce
        out: list[Message] = []
        if errors:
            self.nacks.append("; ".join(errors))
            req = discovery_pb2.DiscoveryRequest(
                type_url=url,
                version_info=self.versions.get(url, ""),
                response_nonce=resp.nonce,
                resource_names=sorted(self.names.get(url, ())),
                **self._node(),
            )
            req.error_detail.message = "; ".join(errors)
            out.append(req)
        else:
            self.versions[url] = resp.version_info
            out.append(
                discovery_pb2.DiscoveryRequest(
                    type_url=url,
                    version_info=resp.version_info,
                    response_nonce=resp.nonce,
                    resource_names=sorted(self.names.get(url, ())),
                    **self._node(),
                )
            )
        return self._follow(out)

    def _delta(self, resp: Any) -> list[Message]:
        url = resp.type_url
        self.received.append((url, [r.name for r in resp.resources], list(resp.removed_resources)))
        errors: list[str] = []
        for r in resp.resources:
            err = self._accept(url, r.name, r.resource.value)
            if err:
                errors.append(err)
                continue
            self._hold(url, r.name, r.version, r.resource.value)
        for name in resp.removed_resources:
            self.held[url].pop(name, None)
        req = discovery_pb2.DeltaDiscoveryRequest(type_url=url, response_nonce=resp.nonce, **self._node())
        if errors:
            self.nacks.append("; ".join(errors))
            req.error_detail.message = "; ".join(errors)
        return self._follow([req])

    def _name(self, url: str, body: bytes) -> str:
        rtype = types.BY_URL[url]
        m = rtype.message()
        m.ParseFromString(body)
        return str(getattr(m, rtype.name_field))

    def _follow(self, out: list[Message]) -> list[Message]:
        """Subscribe to what the held clusters and listeners fetch by name."""
        for holder, fetched in ((CLUSTER, ENDPOINT), (LISTENER, ROUTE)):
            want = {n for h in self.held[holder.url].values() for (u, n) in h.refs if u == fetched.url}
            have = self.names[fetched.url]
            if want == have:
                continue
            added, dropped = sorted(want - have), sorted(have - want)
            self.names[fetched.url] = want
            for name in dropped:
                self.held[fetched.url].pop(name, None)
            if self.mode == "sotw":
                out.append(
                    discovery_pb2.DiscoveryRequest(
                        type_url=fetched.url,
                        resource_names=sorted(want),
                        version_info=self.versions.get(fetched.url, ""),
                        response_nonce=self.nonces.get(fetched.url, ""),
                        **self._node(),
                    )
                )
            else:
                out.append(
                    discovery_pb2.DeltaDiscoveryRequest(
                        type_url=fetched.url,
                        resource_names_subscribe=added,
                        resource_names_unsubscribe=dropped,
                        **self._node(),
                    )
                )
        return out

    # -- what it would serve --------------------------------------------------------------

    def dangling(self) -> list[str]:
        """Clusters routes send to that are missing or not warm (no endpoints held):
        requests would fail. Make before break means this stays empty at every step."""
        problems = []
        clusters = self.held[CLUSTER.url]
        for rname, r in self.held[ROUTE.url].items():
            for url, cname in r.refs:
                if url != CLUSTER.url:
                    continue
                c = clusters.get(cname)
                if c is None:
                    problems.append(f"route {rname} -> missing cluster {cname}")
                    continue
                for eurl, ename in c.refs:
                    if eurl == ENDPOINT.url and ename not in self.held[ENDPOINT.url]:
                        problems.append(f"route {rname} -> cluster {cname} without endpoints")
        return problems

    def holds(self, resources: ResourceSet) -> bool:
        """Exactly `resources` for listeners and clusters, and their routes/endpoints."""
        for rtype in types.ORDER:
            want = {n: r.body for n, r in resources.of(rtype).items()}
            have = {n: h.body for n, h in self.held[rtype.url].items()}
            if rtype.full_state and want != have:
                return False
            if not rtype.full_state and any(want.get(n) != b for n, b in have.items()):
                return False
            needed = self.names.get(rtype.url, set())
            if not rtype.full_state and any(n in want and have.get(n) != want[n] for n in needed):
                return False
        return True


def run(
    session: Any, client: FakeEnvoy, requests: list[Message], check: Callable[[], None] | None = None
) -> int:
    """Feed requests to the session and its responses to the client until quiet; the
    number of responses. `check` runs after every response the client applies."""
    queue = list(requests)
    responses = 0
    for _ in range(10_000):
        if not queue:
            return responses
        out = session.receive(queue.pop(0))
        for payload in out.sends:
            responses += 1
            queue.extend(client.handle(payload))
            if check is not None:
                check()
    raise AssertionError("the exchange did not settle")


def deliver(out: Any, client: FakeEnvoy, session: Any, check: Callable[[], None] | None = None) -> int:
    """Hand a session's Output (from set_target or tick) to the client and run on."""
    follow: list[Message] = []
    n = 0
    for payload in out.sends:
        n += 1
        follow.extend(client.handle(payload))
        if check is not None:
            check()
    return n + run(session, client, follow, check)
