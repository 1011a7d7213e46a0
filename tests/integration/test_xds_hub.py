"""ADS on the in-process server: the hub feeds it, the node registry hears from it.

An Envoy-like client (tests/support/xds.FakeEnvoy) over a real gRPC stream, in state of
the world and delta: the node's assignment arrives, its ACK is the node's ACTIVE report,
a refused cluster is its FAILED report with the client's words and the client is put
back whole, a reconnect with what it has is sent nothing, bad credentials are refused,
and revocation ends the stream. The real Envoy goes through the same against the real
server process in tests/e2e/test_xds_fleet.py.
"""

from __future__ import annotations

import contextlib
from typing import Any

import grpc
import pytest
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf.message import Message
from sqlalchemy import event

from controlplane.api.identity.v1 import identity_pb2
from controlplane.api.node.v1 import node_pb2
from controlplane.xds.types import CLUSTER, LISTENER
from tests.support.archives import bundle
from tests.support.eventually import eventually
from tests.support.harness import Harness, auth
from tests.support.xds import FakeEnvoy, bundle_files, cluster, endpoints, listener, route
from tests.support.xds_stream import Stream, reconnect

pytestmark = pytest.mark.parametrize("mode", ["sotw", "delta"])
LDS = LISTENER.url


def site(name: str) -> dict[str, bytes]:
    return bundle_files([listener("http", "main"), route("main", name), cluster(name), endpoints(name)])


async def node(harness: Harness, node_id: str) -> node_pb2.Node:
    return (await harness.nodes.GetNode(node_pb2.GetNodeRequest(node_id=node_id))).node


async def test_an_xds_node_follows_the_hub_and_reports_through_the_registry(
    mode: str, harness: Harness, streams: list[Stream]
) -> None:
    edge = await harness.register("edge", {"env": "prod"})
    v1 = await harness.upload(bundle(site("blue")), version="v1")
    await harness.assign(v1, nodes=[edge.node_id])

    def refuse_bad(url: str, name: str, body: bytes) -> str | None:
        return "cluster 'bad' refused by the client" if name == "bad" else None

    client = FakeEnvoy(mode, edge.node_id, reject=refuse_bad)
    streams.append(Stream(harness, client, edge.credential))

    async def applied(digest: str) -> node_pb2.Node:
        n = await node(harness, edge.node_id)
        assert n.applied_digest == digest, n
        return n

    # The ACK of every type is the node's ACTIVE report; GetNode shows what it acknowledged.
    shown = await eventually(lambda: applied(v1), what="ACTIVE at v1")
    assert set(shown.xds.acked_versions) >= {"Listener", "RouteConfiguration", "Cluster"}, shown.xds
    assert shown.xds.running_digest == v1

    # A cluster the client refuses: FAILED with its words, the client put back on v1.
    v2 = await harness.upload(bundle(site("bad")), version="v2")
    await harness.assign(v2, nodes=[edge.node_id])

    async def failed() -> node_pb2.Node:
        n = await node(harness, edge.node_id)
        assert n.failed_digest == v2 and "refused by the client" in n.failed_error, n
        return n

    refused = await eventually(failed, what="FAILED at v2")
    assert refused.applied_digest == v1
    assert refused.xds.last_nack.type == "Cluster" and "refused" in refused.xds.last_nack.error
    assert refused.xds.live

    async def back_on_v1() -> None:
        assert set(client.held[LISTENER.url]) == {"http"}
        assert set(client.held[CLUSTER.url]) == {"blue"}

    await eventually(back_on_v1, what="the refused cluster taken back")

    # v3 is accepted; then the stream is cut and the client reconnects with what it has.
    v3 = await harness.upload(bundle(site("green")), version="v3")
    await harness.assign(v3, nodes=[edge.node_id])
    await eventually(lambda: applied(v3), what="ACTIVE at v3")
    first = harness.app.xds_feeds.sessions[edge.node_id]
    assert first.resources_sent > 0
    session = await reconnect(harness, streams, client, edge.node_id, edge.credential, v3)
    assert session.resources_sent == 0

    # Revoking the node ends its stream.
    await harness.identity.RevokeNode(identity_pb2.RevokeNodeRequest(node_id=edge.node_id))
    assert await streams[-1].ended() is grpc.StatusCode.UNAUTHENTICATED

    # With no stream, GetNode shows what its reports recorded: the versions of v3 it
    # acknowledged, and the NACK of v2.
    kept = (await node(harness, edge.node_id)).xds
    assert not kept.live and kept.HasField("recorded_at"), kept
    assert kept.running_digest == v3 and set(kept.acked_versions) >= {"Listener", "Cluster"}, kept
    assert kept.last_nack.type == "Cluster" and "refused" in kept.last_nack.error, kept


async def test_streams_without_the_nodes_credential_are_refused(
    mode: str, harness: Harness, streams: list[Stream]
) -> None:
    edge = await harness.register("edge")
    other = await harness.register("other")
    api_key = await harness.api_key({"*": 3})
    # (credential, answer, whether the refusal needs to read whom the stream is for)
    cases = [
        (f"{edge.node_id}.cpn_forged", grpc.StatusCode.UNAUTHENTICATED, False),
        ("", grpc.StatusCode.UNAUTHENTICATED, False),
        (other.credential, grpc.StatusCode.PERMISSION_DENIED, True),  # another node's, for edge
        (api_key, grpc.StatusCode.PERMISSION_DENIED, False),  # an operator is not a node
    ]
    stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(harness.channel)
    method = stub.StreamAggregatedResources if mode == "sotw" else stub.DeltaAggregatedResources
    for credential, code, reads in cases:
        call = method(metadata=auth(credential) if credential else None)
        if reads:
            # Written only where the refusal waits for it: a write racing a refusal that
            # needs no request could end the call on the client's side first.
            with contextlib.suppress(grpc.aio.AioRpcError):
                await call.write(FakeEnvoy(mode, edge.node_id).opening()[0])
        assert await call.code() is code, credential

    # A node token is accepted too.
    streams.append(Stream(harness, FakeEnvoy(mode, edge.node_id), edge.token))

    async def serving() -> None:
        assert edge.node_id in harness.app.xds_feeds.sessions

    await eventually(serving, what="the stream opened with a node token")


async def test_requests_of_another_node_on_a_stream_are_refused(mode: str, harness: Harness) -> None:
    edge = await harness.register("edge")
    stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(harness.channel)
    if mode == "sotw":
        call: Any = stub.StreamAggregatedResources(metadata=auth(edge.credential))
        request: Message = discovery_pb2.DiscoveryRequest(
            type_url=LISTENER.url, node={"id": "n-someone-else"}
        )
    else:
        call = stub.DeltaAggregatedResources(metadata=auth(edge.credential))
        request = discovery_pb2.DeltaDiscoveryRequest(type_url=LDS, node={"id": "n-someone-else"})
    with contextlib.suppress(grpc.aio.AioRpcError):
        await call.write(request)
    assert await call.code() is grpc.StatusCode.PERMISSION_DENIED


async def test_a_bundle_without_envoy_resources_is_failed_for_an_xds_node(
    mode: str, harness: Harness, streams: list[Stream]
) -> None:
    edge = await harness.register("edge")
    v1 = await harness.upload(bundle(site("blue")), version="v1")
    await harness.assign(v1, nodes=[edge.node_id])
    streams.append(Stream(harness, FakeEnvoy(mode, edge.node_id), edge.credential))

    async def applied() -> None:
        assert (await node(harness, edge.node_id)).applied_digest == v1

    await eventually(applied, what="ACTIVE at v1")
    plain = await harness.upload(bundle({"nginx.conf": b"events {}\n"}), version="not-xds")
    await harness.assign(plain, nodes=[edge.node_id])

    async def failed() -> node_pb2.Node:
        n = await node(harness, edge.node_id)
        assert n.failed_digest == plain, n
        return n

    refused = await eventually(failed, what="FAILED at the plain bundle")
    assert "holds no valid Envoy resources" in refused.failed_error, refused.failed_error
    assert refused.applied_digest == v1


async def test_a_stream_open_reads_the_node_once(mode: str, harness: Harness, streams: list[Stream]) -> None:
    """Opening an ADS stream reads the node's row once: its credential, its record and
    the log's head in one statement, and the feed starts from the record the check read
    instead of reading it again. A reconnect storm pays this per stream."""
    edge = await harness.register("edge")
    v1 = await harness.upload(bundle(site("blue")), version="v1")
    await harness.assign(v1, nodes=[edge.node_id])
    client = FakeEnvoy(mode, edge.node_id)
    streams.append(Stream(harness, client, edge.credential))

    async def applied() -> None:
        assert (await node(harness, edge.node_id)).applied_digest == v1

    await eventually(applied, what="ACTIVE at v1")
    reads: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "credential_hash" in statement and "WHERE nodes.id =" in statement:
            reads.append(statement)

    engine = harness.app.engine.sync_engine
    event.listen(engine, "before_cursor_execute", count)
    try:
        await reconnect(harness, streams, client, edge.node_id, edge.credential, v1)
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert len(reads) == 1, reads
