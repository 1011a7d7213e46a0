"""The ADS protocol core (state of the world and delta) against an Envoy-like client."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.service.discovery.v3 import discovery_pb2

from controlplane.domain.kernel.errors import InvalidArgument, PermissionDenied, ResourceExhausted
from controlplane.xds import types
from controlplane.xds.delta import DeltaSession
from controlplane.xds.encode import Encoder
from controlplane.xds.session import Limits, Session
from controlplane.xds.snapshot import ResourceSet
from controlplane.xds.sotw import SotwSession
from controlplane.xds.status import Phase
from controlplane.xds.types import CLUSTER, ENDPOINT, LISTENER, ROUTE
from tests.support.xds import FakeEnvoy, deliver, listener, resource, route, run, snap, web

MODES = ["sotw", "delta"]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def session(mode: str, target: Any, **kw: Any) -> Session:
    cls = SotwSession if mode == "sotw" else DeltaSession
    return cls("n1", target, **kw)


def no_dangling(client: FakeEnvoy) -> Any:
    def check() -> None:
        assert client.dangling() == [], "a route points at a cluster that is not ready"

    return check


def kinds(client: FakeEnvoy) -> list[str]:
    return [types.short(url) for url, _, _ in client.received]


@pytest.mark.parametrize("mode", MODES)
def test_a_fresh_node_gets_everything_clusters_first_and_is_active(mode: str) -> None:
    v1 = snap(1, web("v1"))
    s = session(mode, v1)
    client = FakeEnvoy(mode)
    run(s, client, client.opening(), no_dangling(client))
    assert client.holds(v1.resources)
    order = kinds(client)
    assert order.index("Cluster") < order.index("ClusterLoadAssignment") < order.index("Listener")
    assert order.index("Listener") < order.index("RouteConfiguration")
    assert s.status is not None and s.status.phase is Phase.ACTIVE and s.status.revision == 1
    assert s.status.running_revision == 1
    assert set(s.status.acked) == {t.url for t in (CLUSTER, ENDPOINT, LISTENER, ROUTE)}


@pytest.mark.parametrize("mode", MODES)
def test_moving_to_a_new_cluster_makes_it_before_breaking_the_old(mode: str) -> None:
    v1 = snap(1, web("v1", clusters=["blue"], route_to="blue"))
    v2 = snap(2, web("v2", clusters=["green"], route_to="green"))
    s = session(mode, v1)
    client = FakeEnvoy(mode)
    run(s, client, client.opening())
    client.received.clear()
    out = s.set_target(v2)
    deliver(out, client, s, no_dangling(client))
    assert client.holds(v2.resources)
    assert "blue" not in client.held[CLUSTER.url]
    # The first cluster response keeps blue beside green; blue goes only at the end.
    cds = [names for url, names, _ in client.received if url == CLUSTER.url]
    if mode == "sotw":
        assert cds[0] == ["blue", "green"] and cds[-1] == ["green"]
    order = kinds(client)
    assert order.index("Cluster") < order.index("RouteConfiguration")
    assert s.status is not None and (s.status.phase, s.status.revision) == (Phase.ACTIVE, 2)


@pytest.mark.parametrize("mode", MODES)
def test_removing_a_listener_goes_before_the_cluster_it_used(mode: str) -> None:
    both = ResourceSet(
        [
            *web("v1", clusters=["a"], route_to="a").all(),
            resource(listener("admin", "adminroutes", 10001)),
            resource(route("adminroutes", "b")),
            *[
                r
                for r in web("v1", clusters=["b"], route_to="b").all()
                if r.type_url in (CLUSTER.url, ENDPOINT.url)
            ],
        ]
    )
    v1, v2 = snap(1, both), snap(2, web("v1", clusters=["a"], route_to="a"))
    s = session(mode, v1)
    client = FakeEnvoy(mode)
    run(s, client, client.opening())
    assert "admin" in client.held[LISTENER.url]
    client.received.clear()
    deliver(s.set_target(v2), client, s, no_dangling(client))
    assert client.holds(v2.resources)
    steps = [(url, names) for url, names, _ in client.received]
    listener_gone = next(i for i, (u, n) in enumerate(steps) if u == LISTENER.url and "admin" not in n)
    cluster_gone = (
        next(i for i, (u, n) in enumerate(steps) if u == CLUSTER.url and "b" not in n)
        if mode == "sotw"
        else None
    )
    if cluster_gone is not None:
        assert listener_gone < cluster_gone
    assert s.status is not None and s.status.phase is Phase.ACTIVE


def refuse_regex(url: str, name: str, body: bytes) -> str | None:
    return "invalid regex: missing )" if url == ROUTE.url and b"(" in body else None


@pytest.mark.parametrize("mode", MODES)
def test_a_nack_fails_the_revision_and_puts_the_last_good_one_back(mode: str) -> None:
    v1 = snap(1, web("v1", clusters=["blue"], route_to="blue"))
    bad = ResourceSet(
        [
            *[r for r in web("v2", clusters=["green"], route_to="green").all() if r.type_url != ROUTE.url],
            resource(route("main", "green", regex="(")),
        ]
    )
    v2 = snap(2, bad)
    s = session(mode, v1)
    client = FakeEnvoy(mode, reject=refuse_regex)
    run(s, client, client.opening())
    deliver(s.set_target(v2), client, s, no_dangling(client))
    assert client.nacks and "invalid regex" in client.nacks[0]
    assert s.status is not None and s.status.phase is Phase.FAILED and s.status.revision == 2
    assert "invalid regex" in s.status.error and s.status.running_revision == 1
    # Envoy accepted green's cluster and endpoints: they are taken back; it runs v1 exactly.
    assert client.holds(v1.resources)
    # No resend loop: the refused revision is not offered again...
    assert s.set_target(v2).sends == []
    # ...until a newer one arrives.
    v3 = snap(3, web("v3", clusters=["green"], route_to="green"))
    deliver(s.set_target(v3), client, s, no_dangling(client))
    assert client.holds(v3.resources)
    assert s.status is not None and (s.status.phase, s.status.revision) == (Phase.ACTIVE, 3)


@pytest.mark.parametrize("mode", MODES)
def test_a_refused_restore_parks_the_type_instead_of_looping(mode: str) -> None:
    v1 = snap(1, web("v1"))
    v2 = snap(2, web("v2", route_to="elsewhere", clusters=["backend", "elsewhere"]))
    s = session(mode, v1)
    client = FakeEnvoy(mode)
    run(s, client, client.opening())
    client.reject = lambda url, name, body: "no" if url == ROUTE.url else None
    responses = deliver(s.set_target(v2), client, s)
    assert responses < 20
    assert s.status is not None and s.status.phase is Phase.FAILED
    assert "refused too" in s.status.error


@pytest.mark.parametrize("mode", MODES)
def test_a_reconnecting_node_with_current_versions_is_sent_nothing(mode: str) -> None:
    v1 = snap(1, web("v1"))
    client = FakeEnvoy(mode)
    run(session(mode, v1), client, client.opening())
    # Another replica (its own encoder, no memory of this node) and a newer revision
    # that changed nothing this node holds.
    again = snap(7, web("v1"))
    other = session(mode, again, base=v1, encoder=Encoder())
    client.received.clear()
    run(other, client, client.opening(resume=True))
    assert other.resources_sent == 0
    assert other.status is not None and (other.status.phase, other.status.revision) == (Phase.ACTIVE, 7)
    assert all(not names for _, names, _ in client.received)


@pytest.mark.parametrize("mode", MODES)
def test_a_reconnecting_node_gets_only_what_changed(mode: str) -> None:
    v1 = snap(1, web("v1"))
    client = FakeEnvoy(mode)
    run(session(mode, v1), client, client.opening())
    v2 = snap(2, web("v2"))  # only the endpoints differ
    other = session(mode, v2, base=v1)
    client.received.clear()
    run(other, client, client.opening(resume=True), no_dangling(client))
    assert client.holds(v2.resources)
    sent = {types.short(url) for url, names, _ in client.received if names}
    assert sent == {"ClusterLoadAssignment"}


@pytest.mark.parametrize("mode", MODES)
def test_a_new_revision_with_the_same_content_sends_nothing(mode: str) -> None:
    s = session(mode, snap(1, web("v1")))
    client = FakeEnvoy(mode)
    run(s, client, client.opening())
    out = s.set_target(snap(2, web("v1")))
    assert out.sends == []
    assert out.status is not None and (out.status.phase, out.status.revision) == (Phase.ACTIVE, 2)


@pytest.mark.parametrize("mode", MODES)
def test_streams_share_serialized_responses_and_nonces_are_unique_per_stream(mode: str) -> None:
    encoder = Encoder()
    target = snap(1, web("v1"))
    payloads = []
    for _ in range(3):
        s = session(mode, target, encoder=encoder)
        client = FakeEnvoy(mode)
        out = s.receive(client.opening()[0])
        payloads.append(out.sends[0])
    assert payloads[0] == payloads[1] == payloads[2]
    assert encoder.shared == 2
    # Within one stream every nonce is new, even when content repeats: restoring v1's
    # route after a NACK sends revision 1's content for the type again.
    s = session(mode, snap(1, web("v1", clusters=["blue"], route_to="blue")))
    client = FakeEnvoy(mode, reject=refuse_regex)
    seen: list[str] = []
    original = client.handle

    def spy(payload: bytes) -> Any:
        cls = discovery_pb2.DiscoveryResponse if mode == "sotw" else discovery_pb2.DeltaDiscoveryResponse
        seen.append(cls.FromString(payload).nonce)
        return original(payload)

    client.handle = spy  # type: ignore[method-assign]
    run(s, client, client.opening())
    bad = ResourceSet(
        [
            *[r for r in web("v2", clusters=["green"], route_to="green").all() if r.type_url != ROUTE.url],
            resource(route("main", "green", regex="(")),
        ]
    )
    deliver(s.set_target(snap(2, bad)), client, s)
    assert client.holds(web("v1", clusters=["blue"], route_to="blue"))
    assert len(seen) == len(set(seen))
    assert any("~" in n for n in seen)


def test_sotw_ignores_stale_and_unknown_nonces() -> None:
    s = session("sotw", snap(1, web("v1")))
    first = s.receive(discovery_pb2.DiscoveryRequest(type_url=CLUSTER.url, node={"id": "n1"}))
    assert len(first.sends) == 1
    stale = s.receive(discovery_pb2.DiscoveryRequest(type_url=CLUSTER.url, response_nonce="nope"))
    assert stale.sends == [] and s.stale_requests == 1
    unknown_first = s.receive(discovery_pb2.DiscoveryRequest(type_url=LISTENER.url, response_nonce="x"))
    assert unknown_first.sends == [] and s.stale_requests == 2
    assert s.types[CLUSTER.url].pending is not None  # still waiting for the real ACK


@pytest.mark.parametrize("mode", MODES)
def test_bad_requests_are_refused_or_ignored(mode: str) -> None:
    clock = Clock()
    s = session(mode, snap(1, web("v1")), clock=clock)
    req: Any = discovery_pb2.DiscoveryRequest if mode == "sotw" else discovery_pb2.DeltaDiscoveryRequest
    names = "resource_names" if mode == "sotw" else "resource_names_subscribe"
    with pytest.raises(InvalidArgument, match="carry the node"):
        s.receive(req(type_url=CLUSTER.url))
    assert (
        s.receive(
            req(type_url="type.googleapis.com/envoy.service.runtime.v3.Runtime", node={"id": "n1"})
        ).sends
        == []
    )
    assert "type.googleapis.com/envoy.service.runtime.v3.Runtime" in s.ignored
    with pytest.raises(InvalidArgument, match="type"):
        s.receive(req(type_url=""))
    with pytest.raises(PermissionDenied, match="n1"):
        s.receive(req(type_url=CLUSTER.url, node={"id": "someone-else"}))
    with pytest.raises(ResourceExhausted, match="100000 names"):
        s.receive(req(type_url=ENDPOINT.url, **{names: [f"c{i}" for i in range(100_000)]}))
    # A flood: the burst goes through (ignored: unknown type), then the stream is refused.
    flood = session(mode, snap(1, web("v1")), clock=clock, limits=Limits(burst=50, rate=10))
    flood.receive(req(type_url="type.googleapis.com/x.Y", node={"id": "n1"}))
    with pytest.raises(ResourceExhausted, match="requests"):
        for _ in range(60):
            flood.receive(req(type_url="type.googleapis.com/x.Y"))
    # After a pause it is admitted again.
    clock.now += 10
    flood.receive(req(type_url="type.googleapis.com/x.Y"))


@pytest.mark.parametrize("mode", MODES)
def test_named_subscriptions_as_grpc_clients_make_them(mode: str) -> None:
    """A proxyless gRPC client asks for its listener by name, then follows it."""
    v1 = snap(1, web("v1"))
    s = session(mode, v1)
    if mode == "sotw":
        out = s.receive(
            discovery_pb2.DiscoveryRequest(type_url=LISTENER.url, resource_names=["http"], node={"id": "n1"})
        )
        resp = discovery_pb2.DiscoveryResponse.FromString(out.sends[0])
        assert [a.type_url for a in resp.resources] == [LISTENER.url]
        out = s.receive(
            discovery_pb2.DiscoveryRequest(
                type_url=LISTENER.url,
                resource_names=["http"],
                response_nonce=resp.nonce,
                version_info=resp.version_info,
            )
        )
        out = s.receive(discovery_pb2.DiscoveryRequest(type_url=ROUTE.url, resource_names=["main"]))
        assert discovery_pb2.DiscoveryResponse.FromString(out.sends[0]).resources[0].type_url == ROUTE.url
        # A name that does not exist is simply not in the response.
        out = s.receive(
            discovery_pb2.DiscoveryRequest(type_url=CLUSTER.url, resource_names=["backend", "ghost"])
        )
        assert len(discovery_pb2.DiscoveryResponse.FromString(out.sends[0]).resources) == 1
    else:
        out = s.receive(
            discovery_pb2.DeltaDiscoveryRequest(
                type_url=LISTENER.url, resource_names_subscribe=["http", "ghost"], node={"id": "n1"}
            )
        )
        resp = discovery_pb2.DeltaDiscoveryResponse.FromString(out.sends[0])
        assert [r.name for r in resp.resources] == ["http"] and list(resp.removed_resources) == ["ghost"]
        out = s.receive(discovery_pb2.DeltaDiscoveryRequest(type_url=LISTENER.url, response_nonce=resp.nonce))
        assert out.sends == []  # ghost is told once only


@pytest.mark.parametrize("mode", MODES)
def test_a_stage_waiting_for_endpoints_never_requested_moves_on_after_the_gate_timeout(mode: str) -> None:
    clock = Clock()
    v1 = snap(1, web("v1"))
    s = session(mode, v1, clock=clock)
    req: Any = discovery_pb2.DiscoveryRequest if mode == "sotw" else discovery_pb2.DeltaDiscoveryRequest
    out = s.receive(req(type_url=CLUSTER.url, node={"id": "n1"}))
    nonce = (
        (discovery_pb2.DiscoveryResponse if mode == "sotw" else discovery_pb2.DeltaDiscoveryResponse)
        .FromString(out.sends[0])
        .nonce
    )
    s.receive(req(type_url=CLUSTER.url, response_nonce=nonce))
    assert s.receive(req(type_url=LISTENER.url)).sends == []  # held: endpoints not acked
    assert s.tick().sends == []
    clock.now += 16
    out = s.tick()
    assert len(out.sends) == 1 and s.gate_timeouts == 1


def test_delta_tells_a_reconnecting_node_what_was_removed_meanwhile() -> None:
    v1 = snap(1, web("v1", clusters=["backend", "spare"]))
    client = FakeEnvoy("delta")
    run(session("delta", v1), client, client.opening())
    assert "spare" in client.held[ENDPOINT.url]
    v2 = snap(2, web("v1"))
    other = session("delta", v2, base=v1)
    client.received.clear()
    run(other, client, client.opening(resume=True))
    removed = sorted((types.short(url), r) for url, _, rem in client.received for r in rem)
    assert removed == [("Cluster", "spare"), ("ClusterLoadAssignment", "spare")]
    assert "spare" not in client.held[ENDPOINT.url]
    assert other.resources_sent == 0
    assert other.status is not None and (other.status.phase, other.status.revision) == (Phase.ACTIVE, 2)
