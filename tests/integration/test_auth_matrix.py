"""The whole authorization matrix: every RPC the server serves (found from the service
descriptors, so RPCs added later are covered without editing this) called by every kind
of caller, each answer checked.

- UNAUTHENTICATED: no credential, an expired token, a token signed by a key the server
  does not know, a node credential anywhere but IssueNodeToken;
- PERMISSION_DENIED: a node calling operator RPCs, an API key calling node RPCs, a role
  below the rule's, a key of another project, a project key on a global operation;
- admitted: anything else (the servicer's own answer: OK, NOT_FOUND, INVALID_ARGUMENT ...).
"""

from __future__ import annotations

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from controlplane.api.identity.v1 import identity_pb2 as ipb
from controlplane.domain.roles import Role
from controlplane.rpc.auth import POLICY, ROLE_FOR, Rule
from tests.support.harness import Harness, auth
from tests.support.identities import callers
from tests.support.rpcs import Rpc, all_rpcs, invoke

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED
# Codes that would mean the call was neither refused by authorization nor served.
_BROKEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNIMPLEMENTED}
_REFUSED = {UNAUTHENTICATED, DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED}

# Callers in the order they call (the admins last: their calls really revoke things).
ORDER = [
    "none",
    "expired-token",
    "unknown-key-token",
    "node-credential",
    "node",
    "reader",
    "operator",
    "other-project-admin",
    "admin",
    "global-admin",
]
ROLE_IN_DEFAULT = {
    "reader": Role.READER,
    "operator": Role.OPERATOR,
    "admin": Role.ADMIN,
    "global-admin": Role.ADMIN,
}


def expected(rule: Rule, caller: str, scoped: bool) -> str:
    if rule is Rule.PUBLIC:
        return "admitted"
    if caller in ("none", "expired-token", "unknown-key-token"):
        return "UNAUTHENTICATED"
    if rule is Rule.NODE_CREDENTIAL:
        return "admitted" if caller == "node-credential" else "UNAUTHENTICATED"
    if caller == "node-credential":
        return "UNAUTHENTICATED"
    if caller == "node":
        return "admitted" if rule in (Rule.NODE, Rule.NODE_OR_READ) else "PERMISSION_DENIED"
    if rule is Rule.NODE:
        return "PERMISSION_DENIED"
    if not scoped:
        return "admitted" if caller == "global-admin" else "PERMISSION_DENIED"
    role = ROLE_IN_DEFAULT.get(caller)
    return "admitted" if role is not None and role >= ROLE_FOR[rule] else "PERMISSION_DENIED"


def outcome(code: grpc.StatusCode) -> str:
    if code in _REFUSED:
        return code.name
    return "BROKEN:" + code.name if code in _BROKEN else "admitted"


def request_for(rpc: Rpc, h: Harness, node_id: str, victim_key: str) -> tuple[Message, bool]:
    """A request naming project `default` (and its node, a spare key) wherever the message
    has such a field; and whether it is scoped to a project at all."""
    message = rpc.request_class()
    scoped = False
    for field in message.DESCRIPTOR.fields:
        if field.is_repeated:
            continue
        if field.type == FieldDescriptor.TYPE_STRING:
            value = {"project": "default", "node_id": node_id, "key_id": victim_key}.get(field.name)
            if value is not None:
                setattr(message, field.name, value)
                scoped = True
        elif (
            field.type == FieldDescriptor.TYPE_MESSAGE
            and field.message_type is not None
            and "project" in field.message_type.fields_by_name
        ):
            getattr(message, field.name).project = "default"
            scoped = True
    if rpc.name == "GetProject":
        message.name = "default"  # type: ignore[attr-defined]
        scoped = True
    if rpc.name == "CreateProject":
        message.name = "made-by-matrix"  # type: ignore[attr-defined]
    if rpc.name == "RegisterNode":
        message.enrollment_token = h.token  # type: ignore[attr-defined]
    return message, scoped


async def test_every_rpc_by_every_caller(harness: Harness) -> None:
    c = await callers(harness)
    by_name = dict(c.by_name)
    by_name["node-credential"] = auth(c.node.credential)
    victim = await harness.api_key({"default": ipb.ROLE_READER}, name="revoked by the matrix")
    rpcs = all_rpcs()
    assert len(rpcs) >= 35
    missing = [r.path for r in rpcs if r.path not in POLICY]
    assert not missing, f"RPCs without a rule: {missing}"
    wrong: list[str] = []
    seen: dict[str, int] = {}
    # A bare channel: the harness's own would sign credential-less calls as its admin.
    async with grpc.aio.insecure_channel(harness.address) as channel:
        for caller in ORDER:
            for rpc in rpcs:
                request, scoped = request_for(rpc, harness, c.node.node_id, victim.split("_")[1])
                code = await invoke(channel, rpc, request, metadata=by_name[caller])
                want, got = expected(POLICY[rpc.path], caller, scoped), outcome(code)
                seen[got] = seen.get(got, 0) + 1
                if got != want:
                    wrong.append(f"{rpc.path} by {caller}: want {want}, got {got}")
    assert not wrong, "\n".join(wrong)
    # Every caller was tried on every RPC, and each verdict really happened.
    assert sum(seen.values()) == len(ORDER) * len(rpcs)
    assert seen.keys() == {"admitted", "UNAUTHENTICATED", "PERMISSION_DENIED"}, seen


async def test_health_and_reflection_stay_open(harness: Harness) -> None:
    c = await callers(harness)
    async with grpc.aio.insecure_channel(harness.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        for caller, metadata in c.by_name.items():
            reply = await health.Check(health_pb2.HealthCheckRequest(), metadata=metadata)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, caller
            ask = reflection_pb2.ServerReflectionRequest(list_services="")
            answers = [a async for a in reflection.ServerReflectionInfo(iter([ask]), metadata=metadata)]
            names = {s.name for s in answers[0].list_services_response.service}
            assert "controlplane.identity.v1.IdentityService" in names, caller
