"""xDS nodes identified by their client certificate alone (mutual TLS), on the real
server process: `--tls-node-ca` names the CA whose certificates identify nodes, by their
URI SAN `urn:controlplane:node:<project>:<node id>` (docs/xds.md).

A real Envoy whose bootstrap carries no credential, only a client certificate in the
transport socket to the control plane, receives its bundle, acknowledges it (ACTIVE)
and serves it. Refused: no certificate (in the handshake), a certificate of the
operators' CA naming the node, a certificate naming another project, a stream whose
Envoy node id is not the node its certificate names, and a revoked node's certificate.
grpcio's proxyless xDS client, its bootstrap's `tls` channel credentials holding the node
certificate (no call credentials), is served too.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import grpc
import pytest
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from grpc_health.v1 import health, health_pb2_grpc

from controlplane.api.identity.v1 import identity_pb2, identity_pb2_grpc
from controlplane.api.node.v1 import node_pb2
from controlplane.xds.bootstrap import NODE_URI, BootstrapSpec, Tls, bootstrap
from tests.e2e.test_xds_fleet import LDS, site
from tests.e2e.test_xds_grpc_proxyless import messages, run_client
from tests.support.archives import bundle
from tests.support.certs import CertificateAuthority, Pair
from tests.support.envoy import EnvoyProcess, get
from tests.support.eventually import eventually
from tests.support.ports import unused_port
from tests.support.processes import ClientTls, ControlClient, ServerProcess, open_channel
from tests.support.proxies import upstreams
from tests.support.xds import bundle_files

pytestmark = pytest.mark.e2e


async def _ads_code(address: str, tls: ClientTls, envoy_node_id: str) -> grpc.StatusCode:
    """What the server answers an ADS stream with no metadata over `tls`."""
    channel = open_channel(address, tls)
    try:
        call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).DeltaAggregatedResources()
        with contextlib.suppress(grpc.aio.AioRpcError):
            await call.write(discovery_pb2.DeltaDiscoveryRequest(type_url=LDS, node={"id": envoy_node_id}))
        # An accepted stream stays open: an answer (the listeners) shows it was accepted.
        reply = await call.read()
        if reply is not grpc.aio.EOF:
            call.cancel()
            return grpc.StatusCode.OK
        return await call.code()
    except grpc.aio.AioRpcError as e:
        return e.code()
    finally:
        await channel.close()


async def mtls_server(
    tmp_path: Path,
) -> tuple[CertificateAuthority, CertificateAuthority, CertificateAuthority, ServerProcess]:
    """The server CA, the operators' client CA, the node CA, and a started server with
    `--tls-client-ca` (operators) and `--tls-node-ca` (nodes); its clients hold an
    operator's certificate."""
    pki = CertificateAuthority(tmp_path / "pki", "server CA")
    server_pair = pki.issue("localhost", server=True)
    operators = CertificateAuthority(tmp_path / "operators", "operator CA")
    node_ca = CertificateAuthority(tmp_path / "nodes", "node CA")
    operator = operators.issue("operator", server=False)
    args = (
        *("--tls-cert", str(server_pair.cert), "--tls-key", str(server_pair.key)),
        *("--tls-client-ca", str(operators.pem), "--tls-node-ca", str(node_ca.pem)),
    )
    server = ServerProcess(
        tmp_path / "server", extra_args=args, tls=ClientTls(pki.pem, operator.cert, operator.key)
    )
    await server.start()
    return pki, operators, node_ca, server


async def test_an_envoy_identified_by_its_client_certificate(tmp_path: Path) -> None:
    pki, operators, node_ca, server = await mtls_server(tmp_path)
    control = ControlClient(server.address, tls=server.tls)
    envoy: EnvoyProcess | None = None
    try:
        ids = []
        for name in ("edge-a", "edge-b"):
            reply = await control.nodes.RegisterNode(
                node_pb2.RegisterNodeRequest(
                    project="default", enrollment_token=server.token, name=name, labels={"env": "prod"}
                ),
                timeout=10,
            )
            ids.append(reply.node_id)
        a, b = ids

        def node_cert(ca: CertificateAuthority, name: str, uri: str) -> ClientTls:
            pair: Pair = ca.issue(name, server=False, uris=(uri,))
            return ClientTls(pki.pem, pair.cert, pair.key)

        cert_a = node_cert(node_ca, "edge-a", f"{NODE_URI}default:{a}")
        cert_b = node_cert(node_ca, "edge-b", f"{NODE_URI}default:{b}")

        with upstreams() as ups:
            port = unused_port()
            digest = await control.upload(bundle(site(port, "app-v1", ups["v1"].port)), version="v1")
            await control.assign(digest, nodes=[a])

            # 1. A real Envoy with only its certificate: served, ACTIVE, serving.
            workdir = tmp_path / "envoy-a"
            workdir.mkdir()
            admin = unused_port()
            assert cert_a.cert is not None and cert_a.key is not None
            spec = BootstrapSpec(
                node_id=a,
                project="default",
                server_host="127.0.0.1",
                server_port=server.port,
                admin_port=admin,
                tls=Tls(str(pki.pem), str(cert_a.cert), str(cert_a.key), server_name="localhost"),
                metrics=False,
            )
            config = bootstrap(spec)
            assert "initial_metadata" not in str(config)
            envoy = EnvoyProcess(config, workdir, admin)
            await envoy.start()
            await control.wait_node(a, lambda n: n.applied_digest == digest, timeout=60, what="edge-a ACTIVE")

            async def serves() -> None:
                assert await get(f"http://127.0.0.1:{port}/") == (200, "v1")

            await eventually(serves, timeout=30, what="Envoy serving v1")

        # 2. Refused: no certificate at all (the handshake), the operators' CA naming
        #    the node, another project, another node's id, a revoked node.
        assert await _ads_code(server.address, ClientTls(pki.pem), a) == grpc.StatusCode.UNAVAILABLE
        forged = node_cert(operators, "edge-a-forged", f"{NODE_URI}default:{a}")
        assert await _ads_code(server.address, forged, a) == grpc.StatusCode.UNAUTHENTICATED
        elsewhere = node_cert(node_ca, "edge-a-elsewhere", f"{NODE_URI}other:{a}")
        assert await _ads_code(server.address, elsewhere, a) == grpc.StatusCode.UNAUTHENTICATED
        assert await _ads_code(server.address, cert_b, a) == grpc.StatusCode.PERMISSION_DENIED
        assert await _ads_code(server.address, cert_b, b) == grpc.StatusCode.OK
        identity = identity_pb2_grpc.IdentityServiceStub(control.channel)
        await identity.RevokeNode(
            identity_pb2.RevokeNodeRequest(node_id=b), metadata=control.metadata, timeout=10
        )
        assert await _ads_code(server.address, cert_b, b) == grpc.StatusCode.UNAUTHENTICATED
    except BaseException:
        if envoy is not None:
            print(envoy.log()[-4000:])
        print(server.log()[-6000:])
        raise
    finally:
        if envoy is not None:
            await envoy.stop()
        await control.close()
        await server.close()


async def test_a_proxyless_grpc_client_identified_by_its_client_certificate(tmp_path: Path) -> None:
    """grpcio's own xDS client (`xds:///greeter`), its bootstrap's `tls` channel
    credentials carrying the node certificate and no call credentials, follows the real
    server: it is served its bundle and reaches the backend the bundle names."""
    pki, _, node_ca, server = await mtls_server(tmp_path)
    control = ControlClient(server.address, tls=server.tls)
    backend = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), backend)
    backend_port = backend.add_insecure_port("127.0.0.1:0")
    await backend.start()
    try:
        reply = await control.nodes.RegisterNode(
            node_pb2.RegisterNodeRequest(project="default", enrollment_token=server.token, name="greeter-1"),
            timeout=10,
        )
        node_id = reply.node_id
        cert = node_ca.issue("greeter-1", server=False, uris=(f"{NODE_URI}default:{node_id}",))
        digest = await control.upload(bundle(bundle_files(messages(backend_port))), version="g1")
        await control.assign(digest, nodes=[node_id])
        creds = {
            "ca_certificate_file": str(pki.pem),
            "certificate_file": str(cert.cert),
            "private_key_file": str(cert.key),
        }
        bootstrap_config = {
            "xds_servers": [
                {
                    "server_uri": f"localhost:{server.port}",
                    "channel_creds": [
                        {"type": "tls", "config": {**creds, "private_key_file": str(cert.key)}}
                    ],
                    "server_features": ["xds_v3"],
                }
            ],
            "node": {"id": node_id, "cluster": "default"},
        }
        env = {"PATH": os.environ.get("PATH", ""), "GRPC_XDS_BOOTSTRAP_CONFIG": json.dumps(bootstrap_config)}
        assert await run_client(env) == "SERVING"
        await control.wait_node(node_id, lambda n: n.applied_digest == digest, timeout=30, what="ACTIVE")
    except BaseException:
        print(server.log()[-6000:])
        raise
    finally:
        await backend.stop(0)
        await control.close()
        await server.close()
