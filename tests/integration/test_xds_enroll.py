"""Autoscaled fleets: an Envoy enrolls itself on first contact (docs/xds.md).

With `serve --xds-enrollment`, an ADS stream whose metadata carries an enrollment token
registers the node its first request names (`node.id` the name, `node.cluster` the
project), as RegisterNode would; its labels come from `node.metadata` only with
`--xds-metadata-labels`. Reconnects with the same token resume that node. An
Envoy-like client (tests/support/xds.FakeEnvoy) over the in-process server.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc
from sqlalchemy import update

from controlplane.api.identity.v1 import identity_pb2 as ipb
from controlplane.api.node.v1 import node_pb2
from controlplane.api.third_party.envoy.service.metrics.v3 import metrics_service_pb2 as metrics_pb
from controlplane.api.third_party.envoy.service.metrics.v3 import metrics_service_pb2_grpc as metrics_grpc
from controlplane.store.schema import enrollment_tokens
from controlplane.xds.types import CLUSTER
from tests.conftest import HarnessFactory
from tests.integration.test_xds_hub import site
from tests.support.archives import bundle
from tests.support.eventually import eventually
from tests.support.harness import Harness, auth
from tests.support.xds import FakeEnvoy
from tests.support.xds_stream import Stream, reconnect

pytestmark = pytest.mark.parametrize("mode", ["sotw", "delta"])


@dataclass
class EnrollingEnvoy(FakeEnvoy):
    """A FakeEnvoy whose node carries its project (cluster) and metadata labels."""

    cluster: str = "default"
    labels: dict[str, str] = field(default_factory=dict)

    def _node(self) -> dict[str, Any]:
        first = super()._node()
        if first:
            node = base_pb2.Node(id=self.node_id, cluster=self.cluster)
            if self.labels:
                node.metadata.update({"labels": self.labels})
            first = {"node": node}
        return first


async def enrolled(h: Harness, name: str) -> node_pb2.Node:
    """The node the open stream of Envoy `name` was enrolled as."""
    for node_id, session in h.app.xds_feeds.sessions.items():
        if session.alias == name:
            return (await h.nodes.GetNode(node_pb2.GetNodeRequest(node_id=node_id))).node
    raise AssertionError(f"no stream of {name!r} yet")


async def refused(h: Harness, mode: str, token: str, client: FakeEnvoy) -> grpc.StatusCode:
    stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(h.channel)
    method = stub.StreamAggregatedResources if mode == "sotw" else stub.DeltaAggregatedResources
    call = method(metadata=auth(token))
    with contextlib.suppress(grpc.aio.AioRpcError):
        await call.write(client.opening()[0])
    code: grpc.StatusCode = await call.code()
    return code


async def test_an_envoy_enrolls_on_first_contact_and_its_labels_select_its_bundle(
    mode: str, make_harness: HarnessFactory, streams: list[Stream]
) -> None:
    h = await make_harness(xds_enrollment=True, xds_metadata_labels=True)
    v1 = await h.upload(bundle(site("blue")), version="v1")
    await h.assign(v1, selector="env=prod")
    client = EnrollingEnvoy(mode, "edge-7", labels={"env": "prod"})
    streams.append(Stream(h, client, h.token))

    async def active() -> node_pb2.Node:
        node = await enrolled(h, "edge-7")
        assert node.applied_digest == v1, node
        return node

    node = await eventually(active, what="enrolled, selected by its labels, ACTIVE at v1")
    assert node.name == "edge-7" and node.id.startswith("n-") and dict(node.labels) == {"env": "prod"}
    assert set(client.held[CLUSTER.url]) == {"blue"}

    # Its reconnects carry the same token: the same node resumes, and is sent nothing.
    assert (await reconnect(h, streams, client, node.id, h.token, v1)).resources_sent == 0
    assert (await enrolled(h, "edge-7")).id == node.id

    # Its stats sink carries the same token: a flush is the enrolled node's heartbeat.
    flush = metrics_pb.StreamMetricsMessage()
    flush.identifier.node.CopyFrom(base_pb2.Node(id="edge-7", cluster="default"))
    sink = metrics_grpc.MetricsServiceStub(h.channel).StreamMetrics(metadata=auth(h.token))
    await sink.write(flush)

    async def beating() -> None:
        shown = (await h.nodes.GetNode(node_pb2.GetNodeRequest(node_id=node.id))).node
        assert shown.HasField("last_heartbeat_at"), shown

    await eventually(beating, what="a heartbeat from the enrolled Envoy's stats")
    await sink.done_writing()
    await sink

    # A revoked token refuses its reconnects too (Envoy keeps what it last had).
    for token in (
        await h.identity.ListEnrollmentTokens(ipb.ListEnrollmentTokensRequest(project="default"))
    ).tokens:
        await h.identity.RevokeEnrollmentToken(
            ipb.RevokeEnrollmentTokenRequest(project="default", token_id=token.id)
        )
    again = EnrollingEnvoy(mode, "edge-7")
    assert await refused(h, mode, h.token, again) is grpc.StatusCode.UNAUTHENTICATED


async def test_labels_come_from_node_metadata_only_when_allowed(
    mode: str, make_harness: HarnessFactory, streams: list[Stream]
) -> None:
    h = await make_harness(xds_enrollment=True)
    v1 = await h.upload(bundle(site("blue")), version="v1")
    await h.assign(v1, selector="env=prod")
    client = EnrollingEnvoy(mode, "edge-8", labels={"env": "prod"})
    streams.append(Stream(h, client, h.token))
    node = await eventually(lambda: enrolled(h, "edge-8"), what="enrolled")
    assert dict(node.labels) == {} and node.applied_digest == ""

    # Selected by id instead, it gets its bundle.
    await h.assign(v1, nodes=[node.id])

    async def active() -> None:
        assert (await enrolled(h, "edge-8")).applied_digest == v1

    await eventually(active, what="ACTIVE at v1 once assigned by id")


async def test_first_contact_is_refused_without_a_valid_token_or_the_switch(
    mode: str, make_harness: HarnessFactory
) -> None:
    h = await make_harness(xds_enrollment=True)
    envoy = EnrollingEnvoy(mode, "edge-9")
    assert await refused(h, mode, "cpe_not-a-token", envoy) is grpc.StatusCode.UNAUTHENTICATED

    timed = await h.identity.CreateEnrollmentToken(ipb.CreateEnrollmentTokenRequest(project="default"))
    async with h.app.engine.begin() as conn:
        await conn.execute(
            update(enrollment_tokens)
            .where(enrollment_tokens.c.token_hash.like(f"{timed.token.id}%"))
            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    assert await refused(h, mode, timed.secret, envoy) is grpc.StatusCode.UNAUTHENTICATED

    # The token cannot act as a node that holds a credential of its own (an agent's).
    await h.register("agent-1")
    taken = EnrollingEnvoy(mode, "agent-1")
    assert await refused(h, mode, h.token, taken) is grpc.StatusCode.PERMISSION_DENIED
    assert h.app.xds_feeds.sessions == {}

    # Off (the default): a valid token enrolls nothing.
    off = await make_harness()
    assert await refused(off, mode, off.token, envoy) is grpc.StatusCode.UNAUTHENTICATED
