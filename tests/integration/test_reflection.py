"""Server reflection, v1 and v1alpha, on a real server: both list every service and
resolve services, methods, messages and files; an unknown symbol is NOT_FOUND."""

from __future__ import annotations

import grpc
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2 as alpha_pb2
from grpc_reflection.v1alpha import reflection_pb2_grpc as alpha_grpc

from controlplane.api.third_party.grpc.reflection.v1 import reflection_pb2 as v1_pb2
from controlplane.api.third_party.grpc.reflection.v1 import reflection_pb2_grpc as v1_grpc
from tests.support.harness import Harness

WATCH_FILE = "controlplane/watch/v1/watch.proto"


async def _ask(harness: Harness, version: str, **request: object) -> object:
    async with grpc.aio.insecure_channel(harness.address) as channel:
        if version == "v1":
            v1_call = v1_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([v1_pb2.ServerReflectionRequest(**request)])  # type: ignore[arg-type]
            )
            async for answer in v1_call:
                return answer
        alpha_call = alpha_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([alpha_pb2.ServerReflectionRequest(**request)])
        )
        async for answer in alpha_call:
            return answer
    raise AssertionError("the stream ended without an answer")


def _file_names(response: object) -> list[str]:
    names = []
    for blob in response.file_descriptor_response.file_descriptor_proto:  # type: ignore[attr-defined]
        proto = descriptor_pb2.FileDescriptorProto.FromString(blob)
        names.append(proto.name)
    return names


async def test_both_versions_list_every_service_and_find_a_method(harness: Harness) -> None:
    for version in ("v1", "v1alpha"):
        listed = await _ask(harness, version, list_services="")
        names = {s.name for s in listed.list_services_response.service}  # type: ignore[attr-defined]
        assert {
            "controlplane.watch.v1.WatchService",
            "controlplane.node.v1.NodeService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        } <= names, (version, names)
        for symbol in (
            "controlplane.watch.v1.WatchService.WatchBundles",
            "controlplane.watch.v1.WatchService",
            "controlplane.watch.v1.DesiredState",
        ):
            found = await _ask(harness, version, file_containing_symbol=symbol)
            files = _file_names(found)
            assert files[0] == WATCH_FILE, (version, symbol, files)
        by_name = await _ask(harness, version, file_by_filename=WATCH_FILE)
        assert _file_names(by_name)[0] == WATCH_FILE


async def test_an_unknown_symbol_is_not_found(harness: Harness) -> None:
    for symbol in ("controlplane.watch.v1.WatchService.Nope", "no.such.Thing", ""):
        answer = await _ask(harness, "v1", file_containing_symbol=symbol)
        error = answer.error_response  # type: ignore[attr-defined]
        assert error.error_code == grpc.StatusCode.NOT_FOUND.value[0], symbol
        assert symbol in error.error_message
