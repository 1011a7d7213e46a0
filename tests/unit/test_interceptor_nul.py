"""The interceptor's NUL check reads only the fields that can lead to a string, and still
finds a NUL wherever one can be: at any string, map key or value, list item or nested
message of every request type the API has."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from controlplane.api.audit.v1 import audit_pb2
from controlplane.api.bundle.v1 import bundle_pb2, signing_pb2
from controlplane.api.identity.v1 import identity_pb2
from controlplane.api.node.v1 import node_pb2
from controlplane.api.project.v1 import project_pb2
from controlplane.api.rollout.v1 import drift_pb2, rollout_pb2
from controlplane.api.watch.v1 import watch_pb2
from controlplane.rpc.interceptor import _lenient, _Refused, _string_fields

_MODULES = [
    audit_pb2,
    bundle_pb2,
    signing_pb2,
    identity_pb2,
    node_pb2,
    project_pb2,
    rollout_pb2,
    drift_pb2,
    watch_pb2,
]
_NUL = "a\x00b"


def _request_types() -> list[Descriptor]:
    found: dict[str, Descriptor] = {}
    for module in _MODULES:
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                found[method.input_type.full_name] = method.input_type
    return sorted(found.values(), key=lambda d: d.full_name)


REQUESTS = _request_types()


def _place(
    message: Message, descriptor: Descriptor, prefix: str, depth: int
) -> Iterator[tuple[Message, str]]:
    """Copies of `message`, each with one NUL somewhere under it (to `depth` levels of
    nesting), and the name the check must answer; `message` itself is left as it was."""
    for field in sorted(descriptor.fields, key=lambda f: f.number):
        name = prefix + field.name
        target = field.message_type
        if target is not None and target.GetOptions().map_entry:
            key, value = target.fields_by_name["key"], target.fields_by_name["value"]
            if key.type == FieldDescriptor.TYPE_STRING:
                copy = _copy(message)
                entries = getattr(copy, field.name)
                if value.message_type is None:
                    entries[_NUL] = "v" if value.type == FieldDescriptor.TYPE_STRING else 1
                else:
                    entries[_NUL].SetInParent()
                yield copy, f"{name}[{_NUL!r}]"
            if value.type == FieldDescriptor.TYPE_STRING:
                copy = _copy(message)
                getattr(copy, field.name)["k"] = _NUL
                yield copy, f"{name}['k']"
            elif value.message_type is not None and depth > 0:
                for inner, where in _place(
                    GetMessageClass(value.message_type)(), value.message_type, "", depth - 1
                ):
                    copy = _copy(message)
                    getattr(copy, field.name)["k"].CopyFrom(inner)
                    yield copy, f"{name}['k'].{where}"
        elif field.type == FieldDescriptor.TYPE_STRING:
            copy = _copy(message)
            if field.is_repeated:
                getattr(copy, field.name).extend(["ok", _NUL])
                yield copy, f"{name}[1]"
            else:
                setattr(copy, field.name, _NUL)
                yield copy, name
        elif target is not None and depth > 0:
            for inner, where in _place(GetMessageClass(target)(), target, "", depth - 1):
                copy = _copy(message)
                if field.is_repeated:
                    items = getattr(copy, field.name)
                    items.add()
                    items.add().CopyFrom(inner)
                    yield copy, f"{name}[1].{where}"
                else:
                    getattr(copy, field.name).CopyFrom(inner)
                    yield copy, f"{name}.{where}"


def _copy(message: Message) -> Message:
    copy = type(message)()
    copy.CopyFrom(message)
    return copy


@pytest.mark.parametrize("descriptor", REQUESTS, ids=[d.name for d in REQUESTS])
def test_a_nul_anywhere_in_a_request_is_found_and_named(descriptor: Descriptor) -> None:
    cls = GetMessageClass(descriptor)
    parse = _lenient(cls.FromString)
    assert parse is not None
    placed = list(_place(cls(), descriptor, "", depth=3))
    for message, where in placed:
        refused = parse(message.SerializeToString())
        assert isinstance(refused, _Refused), f"{descriptor.name}: a NUL at {where} was not found"
        assert refused.error.field == where
    # Without the NUL, every one of those requests passes.
    for message, _ in placed:
        clean = message.SerializeToString().replace(b"a\x00b", b"abc")
        assert not isinstance(parse(clean), _Refused)


def test_the_api_has_strings_to_check() -> None:
    """The test above is not vacuous: most request types carry strings, nested too."""
    with_strings = [d for d in REQUESTS if list(_place(GetMessageClass(d)(), d, "", 3))]
    assert len(with_strings) > 40
    assert any("." in where for d in REQUESTS for _, where in _place(GetMessageClass(d)(), d, "", 3))


def test_fields_that_cannot_hold_a_string_are_not_read() -> None:
    """A heartbeat's bytes nearly always hold a zero byte (doubles, a present 0.0), so the
    raw-bytes test lets it through to the walk; the walk then reads its two strings and
    skips the metrics, which are numbers only."""
    heartbeat = node_pb2.HeartbeatRequest(
        node_id="n-1", metrics=node_pb2.NodeMetrics(cpu_percent=0.0, p99_latency_ms=35.0), applied_digest="d"
    )
    assert b"\x00" in heartbeat.SerializeToString()
    assert [name for name, _ in _string_fields(node_pb2.HeartbeatRequest.DESCRIPTOR)] == [
        "node_id",
        "applied_digest",
    ]
    assert _string_fields(node_pb2.NodeMetrics.DESCRIPTOR) == ()
