"""An Envoy moving to another replica on the same PostgreSQL resumes with nothing resent.

Versions and nonces come from revisions and content, never from one process's counter
(docs/xds.md), so an Envoy-like client (tests/support/xds.FakeEnvoy) that held its
stream on replica A and reconnects to replica B with the versions it has is sent
nothing, is ACTIVE there, and follows a change made through A from B; B shows what it
acknowledged while the stream is on A. PostgreSQL only:
B learns of A's writes by NOTIFY (tests/integration/test_replicas.py).
"""

from __future__ import annotations

from typing import Any

import pytest

from controlplane.api.node.v1 import node_pb2
from controlplane.xds.types import CLUSTER
from tests.conftest import HarnessFactory
from tests.integration.test_replicas import listening, notify_only
from tests.integration.test_xds_hub import site
from tests.support.archives import bundle
from tests.support.eventually import eventually
from tests.support.harness import Harness
from tests.support.xds import FakeEnvoy
from tests.support.xds_stream import Stream

pytestmark = [pytest.mark.postgres, pytest.mark.parametrize("mode", ["sotw", "delta"])]


async def test_an_envoy_reconnecting_to_another_replica_is_sent_nothing_again(
    mode: str, make_pg_harness: HarnessFactory, streams: list[Stream]
) -> None:
    a = await make_pg_harness()
    b = await make_pg_harness(**notify_only())
    edge = await a.register("edge", {"env": "prod"})
    v1 = await a.upload(bundle(site("blue")), version="v1")
    await a.assign(v1, nodes=[edge.node_id])
    client = FakeEnvoy(mode, edge.node_id)
    streams.append(Stream(a, client, edge.credential))

    async def active_on(h: Harness, digest: str) -> Any:
        session = h.app.xds_feeds.sessions.get(edge.node_id)
        assert session is not None and session.status is not None, "no stream there yet"
        assert session.status.phase.value == "active" and session.status.digest == digest, session.status
        applied = (await h.nodes.GetNode(node_pb2.GetNodeRequest(node_id=edge.node_id))).node
        assert applied.applied_digest == digest, applied
        return session

    on_a = await eventually(lambda: active_on(a, v1), what="ACTIVE at v1 on A")
    assert on_a.resources_sent > 0
    # B, which holds no stream of it, shows what its ACTIVE report recorded.
    shown = (await b.nodes.GetNode(node_pb2.GetNodeRequest(node_id=edge.node_id))).node.xds
    live = (await a.nodes.GetNode(node_pb2.GetNodeRequest(node_id=edge.node_id))).node.xds
    assert not shown.live and live.live
    assert (dict(shown.acked_versions), shown.running_digest) == (dict(live.acked_versions), v1), shown
    assert set(client.held[CLUSTER.url]) == {"blue"}
    received = len(client.received)
    await streams.pop().close()

    # To B, which never served this node nor parsed its bundle: nothing is sent again.
    await eventually(lambda: listening(b), what="B LISTENing")
    streams.append(Stream(b, client, edge.credential, resume=True))
    on_b = await eventually(lambda: active_on(b, v1), what="ACTIVE at v1 on B")
    assert on_b.resources_sent == 0
    assert client.received[received:] == []
    assert b.app.xds_feeds.resources.loads == 1  # B parsed v1 for the node's base, once

    # B goes on serving it: a change made through A reaches the Envoy from B.
    v2 = await a.upload(bundle(site("green")), version="v2")
    await a.assign(v2, nodes=[edge.node_id])
    await eventually(lambda: active_on(b, v2), what="ACTIVE at v2 on B")
    assert set(client.held[CLUSTER.url]) == {"green"}
    assert on_b.resources_sent > 0
