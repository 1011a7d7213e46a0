"""The xDS stream guarantees, checked by hypothesis over random sequences of targets.

Each run moves an Envoy-like client through random revisions (clusters come and go,
routes move between them, some revisions carry a route the client refuses), with the
client reconnecting at random to a fresh session (another replica) now and then:

- make before break: at no point does a route the client holds send traffic to a
  cluster it lacks or that has no endpoints;
- convergence: once quiet, a node reported ACTIVE at R holds exactly R, and a node
  reported FAILED holds exactly the revision it reports running;
- no resend loop: a refused revision costs a bounded number of responses;
- a resume to what the node holds sends nothing.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.xds.delta import DeltaSession
from controlplane.xds.snapshot import ResourceSet, Snapshot
from controlplane.xds.sotw import SotwSession
from controlplane.xds.status import Phase
from controlplane.xds.types import ROUTE
from tests.support.xds import FakeEnvoy, deliver, resource, route, run, snap, web

CLUSTERS = ("a", "b", "c")

step = st.tuples(
    st.sets(st.sampled_from(CLUSTERS), min_size=1),  # clusters of the revision
    st.integers(0, 2),  # which of them the route sends to
    st.integers(0, 3),  # endpoint version
    st.booleans(),  # the route is one the client refuses
    st.integers(0, 4),  # 0: the client reconnects to a fresh session before this step
)


def build(revision: int, clusters: set[str], pick: int, version: int, bad: bool) -> Snapshot:
    names = sorted(clusters)
    target = names[pick % len(names)]
    base = web(f"v{version}", clusters=names, route_to=target)
    if not bad:
        return snap(revision, base)
    items = [r for r in base.all() if r.type_url != ROUTE.url]
    items.append(resource(route("main", target, regex="(")))
    return snap(revision, ResourceSet(items))


def refuse(url: str, name: str, body: bytes) -> str | None:
    return "invalid regex" if url == ROUTE.url and b"(" in body else None


def make(mode: str, target: Snapshot, base: Snapshot | None) -> Any:
    cls = SotwSession if mode == "sotw" else DeltaSession
    return cls("n1", target, base=base)


@pytest.mark.parametrize("mode", ["sotw", "delta"])
@settings(max_examples=60, deadline=None)
@given(steps=st.lists(step, min_size=1, max_size=6))
def test_random_histories_keep_the_stream_guarantees(mode: str, steps: list[Any]) -> None:
    client = FakeEnvoy(mode, reject=refuse)

    def no_dangling() -> None:
        assert client.dangling() == [], "make before break: a route lost its cluster"

    first = build(1, {"a"}, 0, 0, False)
    s = make(mode, first, None)
    run(s, client, client.opening(), no_dangling)
    running = first
    for i, (clusters, pick, version, bad, reconnect) in enumerate(steps, start=2):
        target = build(i, clusters, pick, version, bad)
        if reconnect == 0:
            # Another replica: it knows the node's last good revision from its record.
            s = make(mode, s.target if not s.reverting else s.base, running)
            client.received.clear()
            run(s, client, client.opening(resume=True), no_dangling)
            assert s.resources_sent == 0, "a resume to what the node holds resent something"
        responses = deliver(s.set_target(target), client, s, no_dangling)
        assert responses <= 40, "no resend loop"
        status = s.status
        assert status is not None
        if bad:
            assert status.phase is Phase.FAILED and status.revision == i
            assert client.holds(running.resources), "after a NACK the node runs its last good revision"
            assert status.running_revision == running.revision
        else:
            assert (status.phase, status.revision) == (Phase.ACTIVE, i)
            assert client.holds(target.resources)
            running = target
