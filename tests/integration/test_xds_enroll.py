"""Autoscaled fleets: an Envoy enrolls itself on first contact (docs/xds.md).

With `serve --xds-enrollment`, an ADS stream whose metadata carries an enrollment token
registers the node its first request names (`node.id` the name, `node.cluster` the
project), as RegisterNode would; its labels come from `node.metadata` only with
`--xds-metadata-labels`. Reconnects with the same token resume that node. An
Envoy-like client (tests/support/xds.FakeEnvoy) over the in-process server; later
contacts re-label the node from its metadata, unless an operator set its labels.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc
from envoy.type.v3 import semantic_version_pb2
from sqlalchemy import update

from controlplane.api.audit.v1 import audit_pb2 as apb
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
    """A FakeEnvoy whose node carries its project (cluster), metadata labels and build
    version, as Envoy's does."""

    cluster: str = "default"
    labels: dict[str, str] = field(default_factory=dict)

    def node(self) -> base_pb2.Node:
        node = base_pb2.Node(id=self.node_id, cluster=self.cluster, user_agent_name="envoy")
        node.user_agent_build_version.version.CopyFrom(
            semantic_version_pb2.SemanticVersion(major_number=1, minor_number=40, patch=0)
        )
        if self.labels:
            node.metadata.update({"labels": self.labels})
        return node

    def _node(self) -> dict[str, Any]:
        return {"node": self.node()} if super()._node() else {}


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
    # How it was enrolled is a field; its agent version is what Envoy says it runs.
    assert node.enrollment == node_pb2.NODE_ENROLLMENT_XDS_FIRST_CONTACT
    assert node.agent_version == "envoy 1.40.0" and not node.labels_by_operator
    assert set(client.held[CLUSTER.url]) == {"blue"}

    # Its reconnects carry the same token: the same node resumes, and is sent nothing.
    assert (await reconnect(h, streams, client, node.id, h.token, v1)).resources_sent == 0
    assert (await enrolled(h, "edge-7")).id == node.id

    # Its stats sink carries the same token (and node): a flush is its heartbeat.
    flush = metrics_pb.StreamMetricsMessage()
    flush.identifier.node.CopyFrom(client.node())
    sink = metrics_grpc.MetricsServiceStub(h.channel).StreamMetrics(metadata=auth(h.token))
    await sink.write(flush)

    async def beating() -> None:
        shown = (await h.nodes.GetNode(node_pb2.GetNodeRequest(node_id=node.id))).node
        assert shown.HasField("last_heartbeat_at"), shown

    await eventually(beating, what="a heartbeat from the enrolled Envoy's stats")
    await sink.done_writing()
    await sink
    assert dict((await enrolled(h, "edge-7")).labels) == {"env": "prod"}

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
    # Nor do its later contacts label it.
    await reconnect(h, streams, client, node.id, h.token, v1)
    assert dict((await enrolled(h, "edge-8")).labels) == {}


async def test_a_later_contact_relabels_from_metadata_unless_an_operator_set_the_labels(
    mode: str, make_harness: HarnessFactory, streams: list[Stream]
) -> None:
    """An Envoy restarted with other metadata labels is re-labelled (the operator let
    metadata say them), and moves to what they select; once an operator sets its labels,
    metadata no longer changes them."""
    h = await make_harness(xds_enrollment=True, xds_metadata_labels=True)
    prod = await h.upload(bundle(site("blue")), version="prod")
    staging = await h.upload(bundle(site("green")), version="staging")
    await h.assign(prod, selector="env=prod")
    await h.assign(staging, selector="env=staging")
    client = EnrollingEnvoy(mode, "edge-5", labels={"env": "prod"})
    streams.append(Stream(h, client, h.token))

    async def runs(digest: str) -> node_pb2.Node:
        node = await enrolled(h, "edge-5")
        assert node.applied_digest == digest, node
        return node

    node = await eventually(lambda: runs(prod), what="ACTIVE at prod")
    client.labels = {"env": "staging"}
    await reconnect(h, streams, client, node.id, h.token, staging)
    shown = await eventually(lambda: runs(staging), what="ACTIVE at staging, as recorded")
    assert dict(shown.labels) == {"env": "staging"} and set(client.held[CLUSTER.url]) == {"green"}
    audit = await h.audit.ListAuditEvents(apb.ListAuditEventsRequest(project="default"))
    relabel = [e for e in audit.events if e.action == "node.relabel"]
    assert [(e.actor, e.after["from"]) for e in relabel] == [(f"node:{node.id}", "node.metadata")]

    # An operator's labels stand: the next contact's metadata changes nothing.
    reply = await h.nodes.UpdateNodeLabels(
        node_pb2.UpdateNodeLabelsRequest(node_id=node.id, labels={"env": "prod", "pinned": "yes"})
    )
    assert reply.node.labels_by_operator
    await eventually(lambda: runs(prod), what="back at prod, as the operator labelled it")
    await reconnect(h, streams, client, node.id, h.token, prod)
    assert dict((await runs(prod)).labels) == {"env": "prod", "pinned": "yes"}

    # Labels from metadata are checked as RegisterNode's: a bad one refuses the contact.
    bad = EnrollingEnvoy(mode, "edge-6", labels={"Not A Key!": "x"})
    assert await refused(h, mode, h.token, bad) is grpc.StatusCode.INVALID_ARGUMENT


async def test_a_node_revoked_with_reenrollment_allowed_enrolls_again_on_contact(
    mode: str, make_harness: HarnessFactory, streams: list[Stream]
) -> None:
    h = await make_harness(xds_enrollment=True)
    client = EnrollingEnvoy(mode, "edge-4")
    streams.append(Stream(h, client, h.token))
    node = await eventually(lambda: enrolled(h, "edge-4"), what="enrolled")
    await h.identity.RevokeNode(ipb.RevokeNodeRequest(node_id=node.id))
    assert await streams[-1].ended() is grpc.StatusCode.UNAUTHENTICATED
    assert await refused(h, mode, h.token, EnrollingEnvoy(mode, "edge-4")) is grpc.StatusCode.UNAUTHENTICATED

    await h.identity.RevokeNode(ipb.RevokeNodeRequest(node_id=node.id, allow_reenroll=True))
    streams.append(Stream(h, client, h.token))
    again = await eventually(lambda: enrolled(h, "edge-4"), what="enrolled again")
    assert again.id == node.id and again.enrollment == node_pb2.NODE_ENROLLMENT_XDS_FIRST_CONTACT


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
    agent = await h.register("agent-1")
    shown = (await h.nodes.GetNode(node_pb2.GetNodeRequest(node_id=agent.node_id))).node
    assert shown.enrollment == node_pb2.NODE_ENROLLMENT_REGISTERED
    taken = EnrollingEnvoy(mode, "agent-1")
    assert await refused(h, mode, h.token, taken) is grpc.StatusCode.PERMISSION_DENIED
    assert h.app.xds_feeds.sessions == {}

    # Off (the default): a valid token enrolls nothing.
    off = await make_harness()
    assert await refused(off, mode, off.token, envoy) is grpc.StatusCode.UNAUTHENTICATED


async def test_two_streams_of_one_envoy_contacting_at_once_enroll_it_once(
    mode: str, make_harness: HarnessFactory
) -> None:
    """ADS and the stats sink of a new Envoy open together: both see no node, one
    enrolls it, the other resumes it — one use spent, no credential rotated (which
    would end the first stream)."""
    h = await make_harness(xds_enrollment=True)
    made = await h.identity.CreateEnrollmentToken(
        ipb.CreateEnrollmentTokenRequest(project="default", max_uses=2)
    )
    contact = h.app.nodes.contact
    first, second = await asyncio.gather(
        contact("default", made.secret, f"edge-{mode}", None, "envoy 1.40.0"),
        contact("default", made.secret, f"edge-{mode}", None, "envoy 1.40.0"),
    )
    assert first[0].id == second[0].id
    tokens = (
        await h.identity.ListEnrollmentTokens(ipb.ListEnrollmentTokensRequest(project="default"))
    ).tokens
    assert [t.uses_left for t in tokens if t.id == made.token.id] == [1]
    audit = await h.audit.ListAuditEvents(apb.ListAuditEventsRequest(project="default"))
    assert [e.action for e in audit.events if e.resource == f"node/{first[0].id}"] == ["node.register"]
