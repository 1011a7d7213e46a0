"""The agent's identity: it registers once, sends its credential only to IssueNodeToken,
renews the token before it expires, fetches a new one when refused, registers again when
the credential itself is refused, and proves itself when registering its name again."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from agent_stub.config import AgentConfig
from agent_stub.identity import Registrar
from agent_stub.logs import EventLog
from agent_stub.state import Identity, MemoryStateStore
from controlplane.api.identity.v1 import identity_pb2 as ipb
from controlplane.api.node.v1 import node_pb2 as npb
from tests.support.eventually import eventually


class Plane:
    """RegisterNode and IssueNodeToken, scripted."""

    def __init__(self) -> None:
        self.registrations: list[tuple[npb.RegisterNodeRequest, str]] = []
        self.exchanges: list[str] = []
        self.refuse_credentials: set[str] = set()
        self.unimplemented = False
        self.now = 1000.0
        self.server: Any = None
        self.address = ""

    async def start(self) -> None:
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers(
            [
                grpc.method_handlers_generic_handler(
                    "controlplane.node.v1.NodeService",
                    {
                        "RegisterNode": grpc.unary_unary_rpc_method_handler(
                            self._register,
                            request_deserializer=npb.RegisterNodeRequest.FromString,
                            response_serializer=npb.RegisterNodeResponse.SerializeToString,
                        )
                    },
                ),
                grpc.method_handlers_generic_handler(
                    "controlplane.identity.v1.IdentityService",
                    {
                        "IssueNodeToken": grpc.unary_unary_rpc_method_handler(
                            self._exchange,
                            request_deserializer=ipb.IssueNodeTokenRequest.FromString,
                            response_serializer=ipb.IssueNodeTokenResponse.SerializeToString,
                        )
                    },
                ),
            ]
        )
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        await self.server.start()

    async def _register(self, request: npb.RegisterNodeRequest, context: Any) -> npb.RegisterNodeResponse:
        presented = dict(context.invocation_metadata()).get("authorization", "")
        self.registrations.append((request, presented))
        return npb.RegisterNodeResponse(node_id="n-1", node_credential=f"n-1.cred{len(self.registrations)}")

    async def _exchange(self, request: ipb.IssueNodeTokenRequest, context: Any) -> ipb.IssueNodeTokenResponse:
        if self.unimplemented:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        credential = dict(context.invocation_metadata())["authorization"].removeprefix("Bearer ")
        if credential in self.refuse_credentials:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "node credential is not valid")
        self.exchanges.append(credential)
        expires = Timestamp(seconds=int(self.now + 900))
        return ipb.IssueNodeTokenResponse(token=f"eyJtoken{len(self.exchanges)}", expires_at=expires)


@pytest.fixture
async def plane() -> AsyncIterator[Plane]:
    p = Plane()
    await p.start()
    yield p
    await p.server.stop(None)


@pytest.fixture
async def channel(plane: Plane) -> AsyncIterator[Any]:
    async with grpc.aio.insecure_channel(plane.address) as ch:
        yield ch


def registrar(plane: Plane, channel: Any, state: MemoryStateStore | None = None) -> Registrar:
    config = AgentConfig(server=plane.address, project="default", token="cpe_t", name="edge-1")
    log = EventLog(logging.getLogger("test.agent"), {"node": None})
    return Registrar(channel, config, state or MemoryStateStore(), log, clock=lambda: plane.now)


async def test_registers_once_and_sends_the_credential_only_for_tokens(plane: Plane, channel: Any) -> None:
    r = registrar(plane, channel)
    identity = await r.ensure()
    assert identity.credential == "n-1.cred1"
    assert plane.exchanges == ["n-1.cred1"]
    assert r.metadata() == (("authorization", "Bearer eyJtoken1"),)
    await r.ensure()
    assert (len(plane.registrations), len(plane.exchanges)) == (1, 1)


async def test_renews_at_two_thirds_of_the_life_in_the_background(plane: Plane, channel: Any) -> None:
    r = registrar(plane, channel)
    await r.ensure()
    plane.now += 590  # under two thirds of 900 s
    assert r.bearer() == "eyJtoken1"
    await asyncio.sleep(0.05)
    assert len(plane.exchanges) == 1
    plane.now += 20
    assert r.bearer() == "eyJtoken1"  # the caller is never kept waiting

    async def renewed() -> None:
        assert r.bearer() == "eyJtoken2"

    await eventually(renewed, timeout=5, what="token renewed")


async def test_refused_token_means_a_new_token_refused_credential_a_new_registration(
    plane: Plane, channel: Any
) -> None:
    r = registrar(plane, channel)
    await r.ensure()
    r.invalidate()  # a stream ended UNAUTHENTICATED
    await r.ensure()
    assert (len(plane.registrations), plane.exchanges) == (1, ["n-1.cred1", "n-1.cred1"])
    plane.refuse_credentials.add("n-1.cred1")  # revoked, with re-enrollment allowed
    r.invalidate()
    identity = await r.ensure()
    assert identity.credential == "n-1.cred2" and plane.exchanges[-1] == "n-1.cred2"
    # Registering its name again, the agent proves it is the same node.
    assert plane.registrations[-1][1] == "Bearer n-1.cred1"


async def test_a_server_without_tokens_gets_the_credential(plane: Plane, channel: Any) -> None:
    plane.unimplemented = True
    state = MemoryStateStore(identity=Identity("n-1", "n-1.saved", "default", "edge-1", {}))
    r = registrar(plane, channel, state)
    await r.ensure()
    assert r.metadata() == (("authorization", "Bearer n-1.saved"),)
    assert not plane.registrations
