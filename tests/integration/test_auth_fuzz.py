"""Hostile input: hypothesis sends random and mutated messages to every RPC, as every kind
of caller. Nothing may answer INTERNAL or crash the server, and nothing may be half
written: after every example the audit chain verifies and every record a mutation made
has its audit entry."""

from __future__ import annotations

import math
import random
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from controlplane.domain import audit
from controlplane.store.schema import api_keys, audit_log, nodes, projects
from tests.support.harness import Harness, auth
from tests.support.rpcs import Rpc, all_rpcs, invoke

RPCS = all_rpcs()
BROKEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}
# Values that mean something to the server, mixed with noise.
WORDS = [
    "default",
    "*",
    "",
    "n-0000000000000000",
    "sha256:" + "0" * 64,
    "../../etc/passwd",
    "a=b,c=d",
    "x" * 300,
]
_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
# Mostly an admin: the caller who gets furthest into the servicers.
CALLERS = st.sampled_from(["admin"] * 7 + ["node"] * 2 + ["none"])
SETTINGS = settings(
    max_examples=400,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def scalar(field: FieldDescriptor, known: list[str]) -> st.SearchStrategy[Any]:
    t = field.type
    if t == FieldDescriptor.TYPE_STRING:
        return st.one_of(st.sampled_from(WORDS + known), st.text(max_size=80))
    if t == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=512)
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.one_of(st.sampled_from([0.0, -1.0, math.nan, math.inf, 1e300]), st.floats(width=32))
    if t == FieldDescriptor.TYPE_ENUM:
        return st.integers(-3, 12)  # unknown values too: proto3 enums are open
    lo, hi = _INT_RANGES[t]
    return st.one_of(st.sampled_from([0, -1, 1, lo, hi]), st.integers(lo, hi))


@st.composite
def messages(draw: st.DrawFn, descriptor: Descriptor, known: list[str], depth: int = 0) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for field in descriptor.fields:
        if not draw(st.booleans()):
            continue
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            inner = field.message_type
            assert inner is not None
            if inner.GetOptions().map_entry:
                k, v = inner.fields_by_name["key"], inner.fields_by_name["value"]
                if v.type == FieldDescriptor.TYPE_MESSAGE:
                    continue
                values[field.name] = draw(st.dictionaries(scalar(k, known), scalar(v, known), max_size=4))
            elif depth < 2 and inner.full_name not in ("google.protobuf.Struct", "google.protobuf.Value"):
                one = messages(inner, known, depth + 1)
                values[field.name] = draw(st.lists(one, max_size=3) if field.is_repeated else one)
        elif field.is_repeated:
            values[field.name] = draw(st.lists(scalar(field, known), max_size=4))
        else:
            values[field.name] = draw(scalar(field, known))
    return values


def build(message: Message, values: dict[str, Any]) -> Message:
    for name, value in values.items():
        field = message.DESCRIPTOR.fields_by_name[name]
        target = getattr(message, name)
        is_map = field.message_type is not None and field.message_type.GetOptions().map_entry
        try:
            if field.type == FieldDescriptor.TYPE_MESSAGE and is_map:
                target.update(value)
            elif field.type == FieldDescriptor.TYPE_MESSAGE and field.is_repeated:
                for item in value:
                    build(target.add(), item)
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                build(target, value)
                if not value:
                    target.SetInParent()
            elif field.is_repeated:
                target.extend(value)
            else:
                setattr(message, name, value)
        except (ValueError, TypeError):
            pass  # a oneof sibling or a value the type refuses locally: leave it unset
    return message


class World:
    """Callers and known ids, made once per server."""

    def __init__(self, h: Harness):
        self.h = h
        self.callers: dict[str, tuple[tuple[str, str], ...]] = {}
        self.known: list[str] = []

    async def ready(self) -> World:
        if not self.callers:
            node = await self.h.register("fuzz-node", {"env": "prod"})
            self.callers = {"admin": auth(self.h.admin_key), "node": node.metadata, "none": ()}
            self.known = [node.node_id, self.h.admin_key.split("_")[1], self.h.token]
        return self


_worlds: dict[int, World] = {}


async def world(h: Harness) -> World:
    return await _worlds.setdefault(id(h), World(h)).ready()


async def check_nothing_half_written(h: Harness) -> None:
    report = await audit.verify(h.app.store, h.app.store._audit_key)
    assert report.ok, report.reason
    async with h.app.engine.connect() as conn:

        async def count(query: Any) -> int:
            return int(await conn.scalar(query) or 0)

        def entries(action: str) -> Any:
            return select(func.count()).select_from(audit_log).where(audit_log.c.action == action)

        assert await count(select(func.count()).select_from(nodes)) <= await count(entries("node.register"))
        assert await count(select(func.count()).select_from(api_keys)) == await count(
            entries("apikey.create")
        )
        assert await count(select(func.count()).select_from(projects)) == await count(
            entries("project.create")
        )


async def assert_serving(h: Harness) -> None:
    reply = await health_pb2_grpc.HealthStub(h.channel).Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


@SETTINGS
@given(data=st.data())
async def test_random_messages_to_every_rpc(harness: Harness, data: st.DataObject) -> None:
    w = await world(harness)
    rpc: Rpc = data.draw(st.sampled_from(RPCS), label="rpc")
    caller = data.draw(CALLERS, label="caller")
    request = build(
        rpc.request_class(), data.draw(messages(rpc.descriptor.input_type, w.known), label="fields")
    )
    async with grpc.aio.insecure_channel(harness.address) as channel:
        code = await invoke(channel, rpc, request, metadata=w.callers[caller], timeout=10)
    assert code not in BROKEN, f"{rpc.path} by {caller} with {request} -> {code}"
    await check_nothing_half_written(harness)


@SETTINGS
@given(data=st.data())
async def test_mutated_bytes_to_every_rpc(harness: Harness, data: st.DataObject) -> None:
    w = await world(harness)
    rpc: Rpc = data.draw(st.sampled_from(RPCS), label="rpc")
    caller = data.draw(CALLERS, label="caller")
    good = build(rpc.request_class(), data.draw(messages(rpc.descriptor.input_type, w.known), label="fields"))
    raw = bytearray(good.SerializeToString())
    rng = random.Random(data.draw(st.integers(0, 2**32), label="seed"))
    for _ in range(data.draw(st.integers(1, 8), label="mutations")):
        choice = rng.randrange(3)
        if choice == 0 and raw:
            raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        elif choice == 1 and raw:
            del raw[rng.randrange(len(raw)) :]
        else:
            raw[rng.randrange(len(raw) + 1) : 0] = bytes(
                rng.randrange(256) for _ in range(rng.randrange(1, 6))
            )
    as_bytes = Rpc(rpc.path, rpc.descriptor)
    async with grpc.aio.insecure_channel(harness.address) as channel:
        code = await invoke(channel, as_bytes, _Raw(bytes(raw)), metadata=w.callers[caller], timeout=10)
    assert code not in BROKEN, f"{rpc.path} by {caller} with {bytes(raw)!r} -> {code}"
    await check_nothing_half_written(harness)
    await assert_serving(harness)


class _Raw:
    """A request already serialized (possibly into something that does not parse)."""

    def __init__(self, data: bytes):
        self.data = data

    def SerializeToString(self) -> bytes:
        return self.data
