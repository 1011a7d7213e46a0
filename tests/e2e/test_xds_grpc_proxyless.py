"""grpcio's proxyless xDS client as a second, independent client of the ADS servicer.

An `xds:///greeter` channel in a separate process (grpcio 1.85, bootstrap from
GRPC_XDS_BOOTSTRAP_CONFIG) resolves its listener, route, cluster and endpoints from
the servicer over mutual TLS and reaches the service they point at. It also shows how
such a client can authenticate: its bootstrap's `call_creds` (gRFC A97, behind
GRPC_EXPERIMENTAL_XDS_BOOTSTRAP_CALL_CREDS) send `authorization: Bearer <JWT read from a
file>` on the ADS stream; without that variable it sends none, and the client
certificate is what identifies the node. (Over plaintext, grpcio refuses to send call
credentials at all: "Established channel does not have a sufficient security level to
transfer call credential".)
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from grpc_health.v1 import health, health_pb2_grpc

from controlplane.domain.kernel.errors import Unauthenticated
from controlplane.domain.model.fleet import Node
from controlplane.rpc import xds as rpc_xds
from controlplane.xds.snapshot import ResourceSet
from controlplane.xds.status import NodeXdsStatus, Phase
from tests.support.certs import CertificateAuthority
from tests.support.eventually import eventually
from tests.support.xds import endpoints, resource, route, snap

pytestmark = pytest.mark.e2e

NODE = "proxyless-1"

CLIENT = """
import sys, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
with grpc.insecure_channel("xds:///greeter") as channel:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
    print(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
"""


async def run_client(env: dict[str, str]) -> str:
    """`CLIENT` in a process of its own with `env` (its bootstrap): what it printed."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CLIENT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode == 0, err.decode()[-3000:]
    return out.decode().strip()


def messages(backend_port: int) -> list[Any]:
    """What a gRPC client needs for `greeter`: an API listener, its route, an EDS cluster
    and its endpoints."""
    manager: Any = hcm.HttpConnectionManager(stat_prefix="greeter")
    manager.rds.route_config_name = "greeter-routes"
    manager.rds.config_source.ads.SetInParent()
    manager.rds.config_source.resource_api_version = 2
    manager.http_filters.add(name="router").typed_config.Pack(router_pb2.Router())
    listener: Any = listener_pb2.Listener(name="greeter")
    listener.api_listener.api_listener.Pack(manager)
    cla: Any = endpoints("greeter", backend_port)
    # gRPC uses only localities with a weight.
    cla.endpoints[0].locality.zone = "local"
    cla.endpoints[0].load_balancing_weight.value = 1
    cluster: Any = cluster_pb2.Cluster(name="greeter", type=cluster_pb2.Cluster.EDS)
    cluster.eds_cluster_config.eds_config.ads.SetInParent()
    cluster.eds_cluster_config.eds_config.resource_api_version = 2
    return [listener, route("greeter-routes", "greeter"), cluster, cla]


def resources(backend_port: int) -> ResourceSet:
    return ResourceSet([resource(m) for m in messages(backend_port)])


class Feed:
    def __init__(self, target: Any):
        self.target = target
        self.base = None
        self._never: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def next(self) -> Any:
        return await self._never

    async def report(self, status: NodeXdsStatus) -> None:
        pass

    def close(self) -> None:
        self._never.cancel()


class Feeds:
    def __init__(self, target: Any):
        self.target = target

    async def open(self, node_id: str, node: Node | None = None) -> Feed:
        return Feed(self.target)


async def test_grpc_proxyless_client_follows_the_servicer(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "pki")
    server_pair = ca.issue("localhost", server=True)
    client_pair = ca.issue(NODE, server=False)

    # gRPC only reads the token's expiry; the signature is the server's to check.
    token = jwt.encode({"sub": NODE, "exp": int(time.time()) + 600}, "x" * 32, algorithm="HS256")
    (tmp_path / "token.jwt").write_text(token)
    backend = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), backend)
    backend_port = backend.add_insecure_port("127.0.0.1:0")
    await backend.start()

    seen: list[tuple[str, str]] = []
    statuses: list[NodeXdsStatus] = []

    async def authenticate(context: grpc.aio.ServicerContext) -> str:
        peer = context.auth_context().get("x509_common_name", [b""])[0].decode()
        bearer = dict(context.invocation_metadata() or ()).get("authorization", "")
        seen.append((peer, bearer))
        if peer != NODE:
            raise Unauthenticated("a node certificate is required")
        return peer

    async def on_status(node_id: str, status: NodeXdsStatus) -> None:
        statuses.append(status)

    ads = rpc_xds.AdsServicer(Feeds(snap(5, resources(backend_port))), authenticate, on_status)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(rpc_xds.handlers(ads, None))
    creds = grpc.ssl_server_credentials(
        [(server_pair.key.read_bytes(), server_pair.cert.read_bytes())],
        root_certificates=ca.pem.read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()

    bootstrap = {
        "xds_servers": [
            {
                "server_uri": f"localhost:{port}",
                "channel_creds": [
                    {
                        "type": "tls",
                        "config": {
                            "ca_certificate_file": str(ca.pem),
                            "certificate_file": str(client_pair.cert),
                            "private_key_file": str(client_pair.key),
                        },
                    }
                ],
                "call_creds": [
                    {"type": "jwt_token_file", "config": {"jwt_token_file": str(tmp_path / "token.jwt")}}
                ],
                "server_features": ["xds_v3"],
            }
        ],
        "node": {"id": NODE, "cluster": "default"},
    }
    try:
        for call_creds in (True, False):
            seen.clear()
            env = {
                "PATH": os.environ.get("PATH", ""),
                "GRPC_XDS_BOOTSTRAP_CONFIG": json.dumps(bootstrap),
                "GRPC_EXPERIMENTAL_XDS_BOOTSTRAP_CALL_CREDS": "true" if call_creds else "false",
            }
            assert await run_client(env) == "SERVING"
            assert seen and seen[0][0] == NODE
            assert seen[0][1] == (f"Bearer {token}" if call_creds else "")

            async def active() -> None:
                assert statuses and (statuses[-1].phase, statuses[-1].revision) == (Phase.ACTIVE, 5), statuses

            await eventually(active, what="the proxyless client ACTIVE at 5")
    finally:
        await server.stop(0)
        await backend.stop(0)
