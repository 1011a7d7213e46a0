"""TLS on the gRPC port, mutual TLS, and grpcurl with an API key — with certificates made
in the test, a real server process, real agents and the real grpcurl binary."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from controlplane.api.node.v1 import node_pb2, node_pb2_grpc
from tests.e2e.test_grpcurl import grpcurl
from tests.support.archives import bundle
from tests.support.certs import CertificateAuthority
from tests.support.processes import (
    FAST_AGENT_ARGS,
    AgentProcess,
    ClientTls,
    ControlClient,
    ServerProcess,
    open_channel,
)

pytestmark = pytest.mark.e2e

FILES = {"site.conf": b"upstream backend { server 10.0.0.1; }\n"}


async def _list_nodes(address: str, tls: ClientTls | None, key: str) -> grpc.StatusCode:
    channel = open_channel(address, tls)
    try:
        stub = node_pb2_grpc.NodeServiceStub(channel)
        await stub.ListNodes(
            node_pb2.ListNodesRequest(project="default"),
            metadata=(("authorization", f"Bearer {key}"),),
            timeout=5,
        )
    except grpc.aio.AioRpcError as e:
        return e.code()
    finally:
        await channel.close()
    return grpc.StatusCode.OK


async def _converge(server: ServerProcess, tmp_path: Path, tls_args: list[str], tls: ClientTls) -> None:
    agent = AgentProcess(
        server=server.address,
        token=server.token,
        state_dir=tmp_path / "agent-edge-1",
        name="edge-1",
        labels={"env": "prod"},
        extra_args=(*FAST_AGENT_ARGS, *tls_args),
    )
    control = ControlClient(server.address, tls=tls)
    try:
        agent.start()
        digest = await control.upload(bundle(FILES))
        await control.assign(digest, selector="env=prod")
        await agent.wait_current(digest)
        assert "token.issued" in agent.log()
    finally:
        await control.close()
        await agent.close()


async def test_tls_serves_agents_operators_and_grpcurl(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "pki")
    cert = ca.issue("server", server=True)
    tls = ClientTls(ca.pem)
    server = ServerProcess(
        tmp_path / "server", extra_args=("--tls-cert", str(cert.cert), "--tls-key", str(cert.key)), tls=tls
    )
    await server.start()
    try:
        await _converge(server, tmp_path, ["--tls-ca", str(ca.pem)], tls)
        assert await _list_nodes(server.address, tls, server.admin_key) == grpc.StatusCode.OK
        # Plaintext gets nowhere near the API.
        assert await _list_nodes(server.address, None, server.admin_key) == grpc.StatusCode.UNAVAILABLE
        # grpcurl, as the README shows it: the CA, the key in a header.
        body = json.dumps({"project": "default"})
        ok = await grpcurl(
            "-cacert",
            str(ca.pem),
            "-H",
            f"authorization: Bearer {server.admin_key}",
            "-d",
            body,
            server.address,
            "controlplane.node.v1.NodeService/ListNodes",
        )
        assert ok[0] == 0, ok[2]
        assert [n["name"] for n in json.loads(ok[1])["nodes"]] == ["edge-1"]
        anonymous = await grpcurl(
            "-cacert", str(ca.pem), "-d", body, server.address, "controlplane.node.v1.NodeService/ListNodes"
        )
        assert anonymous[0] != 0 and "Unauthenticated" in anonymous[2]
        health = await grpcurl("-cacert", str(ca.pem), server.address, "grpc.health.v1.Health/Check")
        assert health[0] == 0 and json.loads(health[1]) == {"status": "SERVING"}
    finally:
        await server.close()


async def test_mutual_tls_refuses_clients_without_a_certificate(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "pki")
    cert = ca.issue("server", server=True)
    node_cert = ca.issue("edge-1", server=False)
    tls = ClientTls(ca.pem, node_cert.cert, node_cert.key)
    args = ("--tls-cert", str(cert.cert), "--tls-key", str(cert.key), "--tls-client-ca", str(ca.pem))
    server = ServerProcess(tmp_path / "server", extra_args=args, tls=tls)
    await server.start()
    try:
        agent_args = [
            "--tls-ca",
            str(ca.pem),
            "--tls-cert",
            str(node_cert.cert),
            "--tls-key",
            str(node_cert.key),
        ]
        await _converge(server, tmp_path, agent_args, tls)
        key = server.admin_key
        assert await _list_nodes(server.address, tls, key) == grpc.StatusCode.OK
        # No client certificate, or one from a CA the server does not trust: refused in
        # the handshake, whatever key the call carries.
        assert await _list_nodes(server.address, ClientTls(ca.pem), key) == grpc.StatusCode.UNAVAILABLE
        stranger = CertificateAuthority(tmp_path / "other-pki", "stranger CA").issue("edge-x", server=False)
        foreign = ClientTls(ca.pem, stranger.cert, stranger.key)
        assert await _list_nodes(server.address, foreign, key) == grpc.StatusCode.UNAVAILABLE
        refused = await grpcurl("-cacert", str(ca.pem), server.address, "grpc.health.v1.Health/Check")
        assert refused[0] != 0
        with_cert = await grpcurl(
            "-cacert",
            str(ca.pem),
            "-cert",
            str(node_cert.cert),
            "-key",
            str(node_cert.key),
            server.address,
            "grpc.health.v1.Health/Check",
        )
        assert with_cert[0] == 0, with_cert[2]
    finally:
        await server.close()
