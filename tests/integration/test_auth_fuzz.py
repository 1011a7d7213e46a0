"""Hostile input: hypothesis sends random and mutated messages to every RPC, as every kind
of caller. Nothing may answer INTERNAL or crash the server (a client stream whose status
grpcio's asyncio client lost is called again: `call_explained`), and nothing may be half
written: around every call the row count of every table and the revision counter are
taken, and every change must be explained by the call having succeeded —

- a call that fails leaves every table's count and the revision as they were, and writes
  no audit entry;
- a read (Get, List, Watch, Export, Diff, Verify, Download, IssueNodeToken) that succeeds
  changes nothing either;
- a mutation that succeeds and adds or removes rows (or takes a revision) wrote audit
  entries carrying its request id, and nothing else wrote audit entries meanwhile.

After every example the audit chain verifies and every node, key and project has the
audit entry of its creation. Background jobs are slowed to once a day, so that every
change seen is the call's."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, fields
from datetime import timedelta
from typing import Any, cast

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import ScalarSelect, Table, bindparam, func, select

from controlplane.api.rollout.v1 import rollout_pb2 as rpb
from controlplane.config import DEFAULTS, Settings
from controlplane.domain.audit import trail
from controlplane.rpc.auth import POLICY, Rule
from controlplane.store.schema import api_keys, audit_log, metadata, nodes, projects, revision_counter
from controlplane.xds.shape import INT_RANGES
from tests.conftest import HarnessFactory
from tests.support.harness import Harness, auth
from tests.support.matrix import CASES, Case
from tests.support.matrix import World as MatrixWorld
from tests.support.matrix import world as matrix_world_of
from tests.support.profiles import examples
from tests.support.rpcs import Answer, Rpc, all_rpcs, answer, unless_lost

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
# Mostly an admin: the caller who gets furthest into the servicers.
CALLERS = st.sampled_from(["admin"] * 7 + ["node"] * 2 + ["none"])
# Nothing runs in the background while the fuzz does (each job waits its interval first).
# No background job runs during a fuzz run (each would change tables on its own
# schedule): every periodic job's interval, and the offline cutoff, a day. Taken from
# Settings, so a job added later is quieted too.
QUIET = {
    f.name: timedelta(days=1)
    for f in fields(Settings)
    if f.name.endswith("_interval") and isinstance(getattr(DEFAULTS, f.name), timedelta)
} | {"offline_after": timedelta(days=1)}
# RPCs that only read: a success changes nothing.
READS = ("Get", "List", "Watch", "Export", "Diff", "Verify", "Download", "IssueNodeToken")
# Tables a mutation may grow without an audit entry: a heartbeat's history ring.
UNAUDITED = {"Heartbeat": {"node_heartbeats"}}
TABLES = sorted(metadata.tables.values(), key=lambda t: t.name)
SETTINGS = settings(
    max_examples=examples(400),
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
    lo, hi = INT_RANGES[t]
    return st.one_of(st.sampled_from([0, -1, 1, lo, hi]), st.integers(lo, hi))


def values_of(field: FieldDescriptor, known: list[str], depth: int = 0) -> st.SearchStrategy[Any] | None:
    """Values for `field` (None: a field left alone, such as a map of messages)."""
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        inner = field.message_type
        assert inner is not None
        if inner.GetOptions().map_entry:
            k, v = inner.fields_by_name["key"], inner.fields_by_name["value"]
            if v.type == FieldDescriptor.TYPE_MESSAGE:
                return None
            return st.dictionaries(scalar(k, known), scalar(v, known), max_size=4)
        if depth < 2 and inner.full_name not in ("google.protobuf.Struct", "google.protobuf.Value"):
            one = messages(inner, known, depth + 1)
            return st.lists(one, max_size=3) if field.is_repeated else one
        return None
    if field.is_repeated:
        return st.lists(scalar(field, known), max_size=4)
    return scalar(field, known)


@st.composite
def messages(draw: st.DrawFn, descriptor: Descriptor, known: list[str], depth: int = 0) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for field in descriptor.fields:
        if not draw(st.booleans()):
            continue
        strategy = values_of(field, known, depth)
        if strategy is not None:
            values[field.name] = draw(strategy)
    return values


@st.composite
def near(draw: st.DrawFn, request: Message, known: list[str]) -> Message:
    """`request` (a valid one) with up to three fields, or fields of its fields, cleared or
    set to random values."""
    out = type(request)()
    out.CopyFrom(request)
    for _ in range(draw(st.integers(0, 3), label="changes")):
        target = out
        fields = list(cast(Descriptor, target.DESCRIPTOR).fields)
        if not fields:
            break
        field = draw(st.sampled_from(fields))
        inner = field.message_type
        if (
            inner is not None
            and inner.fields
            and not field.is_repeated
            and not inner.GetOptions().map_entry
            and draw(st.booleans())
        ):
            target = getattr(out, field.name)
            inner_fields: list[FieldDescriptor] = list(inner.fields)
            field = draw(st.sampled_from(inner_fields))
        target.ClearField(field.name)
        strategy = values_of(field, known, depth=1)
        if strategy is not None and draw(st.booleans()):
            build(target, {field.name: draw(strategy)})
    return out


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
    found = _worlds.get(id(h))
    if found is None or found.h is not h:  # an id outlives its object: a harness of an earlier test
        found = _worlds[id(h)] = World(h)
    return await found.ready()


@pytest.fixture
async def quiet_harness(make_harness: HarnessFactory) -> Harness:
    return await make_harness(**QUIET)


@dataclass(frozen=True)
class Snapshot:
    counts: dict[str, int]
    revision: int


def _count(table: Table) -> ScalarSelect[int]:
    return select(func.count()).select_from(table).scalar_subquery()


def _entries(action: str) -> ScalarSelect[int]:
    return select(func.count()).select_from(audit_log).where(audit_log.c.action == action).scalar_subquery()


# Built once: building a statement of every table costs more than running it.
_SNAPSHOT = select(
    *(_count(t).label(t.name) for t in TABLES),
    select(revision_counter.c.value).scalar_subquery().label("revision"),
)
_AUDITED = select(audit_log.c.action).where(audit_log.c.request_id == bindparam("request_id"))
# What every node, key and project should have an audit entry of its creation for.
_CREATIONS = select(
    _count(nodes).label("nodes"),
    _entries("node.register").label("registered"),
    _count(api_keys).label("api_keys"),
    _entries("apikey.create").label("keys_created"),
    _count(projects).label("projects"),
    _entries("project.create").label("projects_created"),
)


async def snapshot(h: Harness) -> Snapshot:
    """Every table's row count and the revision counter, in one statement."""
    async with h.app.engine.connect() as conn:
        row = (await conn.execute(_SNAPSHOT)).one()._mapping
    return Snapshot({t.name: int(row[t.name]) for t in TABLES}, int(row["revision"]))


_request_ids = itertools.count(1)


async def call_explained(
    h: Harness,
    rpc: Rpc,
    request: Any,
    caller: str,
    credentials: tuple[tuple[str, str], ...],
    background: frozenset[str] = frozenset(),
) -> Answer:
    """Call `rpc` and check every change it made is explained by its answer. Tables in
    `background` are written by background work and not compared. A unary call is made
    once; a client stream again while its status was lost by the client (`unless_lost`),
    each attempt checked as the refusal it was: it changed nothing, audited nothing."""
    return await unless_lost(
        rpc, lambda: _call_once_explained(h, rpc, request, caller, credentials, background)
    )


async def _call_once_explained(
    h: Harness,
    rpc: Rpc,
    request: Any,
    caller: str,
    credentials: tuple[tuple[str, str], ...],
    background: frozenset[str],
) -> Answer:
    request_id = f"fuzz-{next(_request_ids)}"
    before = await snapshot(h)
    async with grpc.aio.insecure_channel(h.address) as channel:
        metadata = (*credentials, ("x-request-id", request_id))
        got = await answer(channel, rpc, request, metadata=metadata, timeout=10)
    after = await snapshot(h)
    async with h.app.engine.connect() as conn:
        audited = list((await conn.execute(_AUDITED, {"request_id": request_id})).scalars())
    changed = {
        t: f"{n} -> {after.counts[t]}"
        for t, n in before.counts.items()
        if after.counts[t] != n and t not in background
    }
    if after.revision != before.revision:
        changed["revision"] = f"{before.revision} -> {after.revision}"
    what = f"{rpc.path} by {caller} -> {got.code.name}: changed {changed}, audited {audited}"
    # Every audit entry of the moment is this call's.
    assert after.counts["audit_log"] - before.counts["audit_log"] == len(audited), what
    if got.code is not grpc.StatusCode.OK or rpc.name.startswith(READS):
        assert not changed and not audited, what
        return got
    unexplained = set(changed) - {"audit_log", "audit_head"} - UNAUDITED.get(rpc.name, set())
    assert audited or not unexplained, what
    return got


async def check_nothing_half_written(h: Harness) -> None:
    report = await trail.verify(h.app.store, h.app.store._audit_key)
    assert report.ok, report.reason
    async with h.app.engine.connect() as conn:
        made = (await conn.execute(_CREATIONS)).one()
    assert made.nodes <= made.registered, made
    assert made.api_keys == made.keys_created, made
    assert made.projects == made.projects_created, made


async def assert_serving(h: Harness) -> None:
    reply = await health_pb2_grpc.HealthStub(h.channel).Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


@SETTINGS
@given(data=st.data())
async def test_random_messages_to_every_rpc(quiet_harness: Harness, data: st.DataObject) -> None:
    w = await world(quiet_harness)
    rpc: Rpc = data.draw(st.sampled_from(RPCS), label="rpc")
    caller = data.draw(CALLERS, label="caller")
    request = build(
        rpc.request_class(), data.draw(messages(rpc.descriptor.input_type, w.known), label="fields")
    )
    code = (await call_explained(quiet_harness, rpc, request, caller, w.callers[caller])).code
    assert code not in BROKEN, f"{rpc.path} by {caller} with {request} -> {code}"
    await check_nothing_half_written(quiet_harness)


@SETTINGS
@given(data=st.data())
async def test_mutated_bytes_to_every_rpc(quiet_harness: Harness, data: st.DataObject) -> None:
    w = await world(quiet_harness)
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
    code = (await call_explained(quiet_harness, rpc, _Raw(bytes(raw)), caller, w.callers[caller])).code
    assert code not in BROKEN, f"{rpc.path} by {caller} with {bytes(raw)!r} -> {code}"
    await check_nothing_half_written(quiet_harness)
    await assert_serving(quiet_harness)


# Near-valid requests: every RPC's valid request of the authorization matrix, a few fields
# changed. Not those acting on running rollouts, nor those that set one going (a retry,
# a promotion, a skipped step): the driver writes to those meanwhile.
ON_RUNNING_ROLLOUTS = (
    "PauseRollout",
    "ResumeRollout",
    "RollbackRollout",
    "PromoteRollout",
    "SkipRolloutStep",
    "RetryRollout",
)
NEAR_CASES = [c for c in CASES if c.rpc not in ON_RUNNING_ROLLOUTS]
# Callers the rule admits: the calls go as deep as they can.
NEAR_CALLERS = {
    Rule.PUBLIC: ["none"],
    Rule.NODE: ["node"],
    Rule.NODE_CREDENTIAL: ["node-credential"],
    Rule.NODE_OR_READ: ["node", "global-admin"],
}
# The driver takes a lease on every rollout it sees, in the background.
DRIVER_TABLES = frozenset({"leases"})


@pytest.fixture
async def matrix_world(make_harness: HarnessFactory) -> AsyncIterator[MatrixWorld]:
    w = await matrix_world_of(await make_harness(**QUIET))
    yield w
    await w.close()


@settings(SETTINGS, max_examples=examples(200))
@given(data=st.data())
async def test_near_valid_requests_to_every_rpc(matrix_world: MatrixWorld, data: st.DataObject) -> None:
    w = matrix_world
    case: Case = data.draw(st.sampled_from(NEAR_CASES), label="case")
    rpc = next(r for r in RPCS if r.name == case.rpc)
    admitted = NEAR_CALLERS.get(POLICY[rpc.path], ["global-admin", "global-admin", "operator"])
    caller = w.callers[data.draw(st.sampled_from(admitted), label="caller")]
    known = [w.node.node_id, w.pinned, w.main, w.second, w.rollout, w.h.token]
    built = await case.build(w)
    requests = built if isinstance(built, list) else [built]
    i = data.draw(st.integers(0, len(requests) - 1), label="message")
    requests[i] = data.draw(near(requests[i], known), label="request")
    for request in requests:
        if isinstance(request, rpb.CreateRolloutRequest) and request.approvals_required < 2:
            # Awaiting approvals, the driver leaves it alone.
            request.approvals_required = 2
    sent = requests if rpc.client_streaming else requests[0]
    code = (await call_explained(w.h, rpc, sent, caller.name, caller.metadata, DRIVER_TABLES)).code
    assert code not in BROKEN, f"{rpc.path} by {caller.name} with {requests} -> {code}"
    await check_nothing_half_written(w.h)


def string_fields(message: Message) -> list[tuple[str, Message, FieldDescriptor]]:
    """Every string (or string map) field of `message` and of its message fields, set or
    not: (field path, the message holding it, the field)."""
    found = []
    for field in cast(Descriptor, message.DESCRIPTOR).fields:
        inner = field.message_type
        if field.type == FieldDescriptor.TYPE_STRING or (
            inner is not None and inner.GetOptions().map_entry and inner.fields_by_name["key"].type == _STRING
        ):
            found.append((field.name, message, field))
        elif inner is not None and not field.is_repeated and inner.full_name.startswith("controlplane."):
            for path, holder, leaf in string_fields(getattr(message, field.name)):
                found.append((f"{field.name}.{path}", holder, leaf))
    return found


_STRING = FieldDescriptor.TYPE_STRING
NUL = "a\x00b"


async def test_a_nul_in_any_string_field_is_refused_naming_it(matrix_world: MatrixWorld) -> None:
    """PostgreSQL cannot store a NUL: a request carrying one is refused before any
    servicer runs, naming the field, on both databases alike."""
    w = matrix_world
    wrong, tried = [], 0
    for case in NEAR_CASES:
        rpc = next(r for r in RPCS if r.name == case.rpc)
        caller = w.callers[NEAR_CALLERS.get(POLICY[rpc.path], ["global-admin"])[0]]
        built = await case.build(w)
        valid = built if isinstance(built, list) else [built]
        for path, _, _ in string_fields(valid[0]):
            requests = [type(m)() for m in valid]
            for copy, original in zip(requests, valid, strict=True):
                copy.CopyFrom(original)
            holder, field = next((h, f) for p, h, f in string_fields(requests[0]) if p == path)
            if field.is_repeated and field.type == _STRING:
                getattr(holder, field.name).append(NUL)
                want = f"{path}[{len(getattr(holder, field.name)) - 1}]"
            elif field.is_repeated:
                getattr(holder, field.name)[NUL] = "v"
                want = f"{path}[{NUL!r}]"
            else:
                setattr(holder, field.name, NUL)
                want = path
            sent = requests if rpc.client_streaming else requests[0]
            got = await call_explained(w.h, rpc, sent, caller.name, caller.metadata, DRIVER_TABLES)
            tried += 1
            if got.code is not grpc.StatusCode.INVALID_ARGUMENT or not got.details.startswith(f"{want}:"):
                wrong.append(f"{case.label} {want}: {got.code.name} {got.details}")
    assert not wrong, "\n".join(wrong)
    assert tried > 100


class _Raw:
    """A request already serialized (possibly into something that does not parse)."""

    def __init__(self, data: bytes):
        self.data = data

    def SerializeToString(self) -> bytes:
        return self.data
