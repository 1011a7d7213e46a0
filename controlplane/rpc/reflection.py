"""Server reflection, `grpc.reflection.v1` and `grpc.reflection.v1alpha`, from one servicer.

grpcio-reflection serves only v1alpha, and cannot find the file of a method symbol
(`grpcurl describe controlplane.watch.v1.WatchService.WatchBundles` said "Symbol not
found"). Both versions have the same messages on the wire, so one implementation on the
v1 types (proto/third_party/grpc/reflection/v1/reflection.proto) answers both.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor

from controlplane.api.third_party.grpc.reflection.v1 import reflection_pb2 as pb

SERVICE_NAMES = ("grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection")
METHOD = "ServerReflectionInfo"


class ReflectionServicer:
    def __init__(self, services: Iterable[str], pool: descriptor_pool.DescriptorPool | None = None):
        self._services = tuple(sorted({*services, *SERVICE_NAMES}))
        self._pool = pool or descriptor_pool.Default()
        # Serialized files by name: descriptors never change in a running process.
        self._files: dict[str, bytes] = {}

    async def ServerReflectionInfo(
        self, requests: AsyncIterator[pb.ServerReflectionRequest], _context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ServerReflectionResponse]:
        async for request in requests:
            yield self.answer(request)

    def answer(self, request: pb.ServerReflectionRequest) -> pb.ServerReflectionResponse:
        kind = request.WhichOneof("message_request")
        try:
            if kind == "list_services":
                return pb.ServerReflectionResponse(
                    original_request=request,
                    list_services_response=pb.ListServiceResponse(
                        service=[pb.ServiceResponse(name=name) for name in self._services]
                    ),
                )
            if kind == "file_by_filename":
                return self._files_of(request, self._pool.FindFileByName(request.file_by_filename))
            if kind == "file_containing_symbol":
                return self._files_of(request, self._file_of_symbol(request.file_containing_symbol))
            if kind == "file_containing_extension":
                ask = request.file_containing_extension
                message = self._pool.FindMessageTypeByName(ask.containing_type)
                extension = self._pool.FindExtensionByNumber(message, ask.extension_number)
                return self._files_of(request, self._pool.FindFileContainingSymbol(extension.full_name))
            if kind == "all_extension_numbers_of_type":
                message = self._pool.FindMessageTypeByName(request.all_extension_numbers_of_type)
                numbers = sorted(e.number for e in self._pool.FindAllExtensions(message))
                return pb.ServerReflectionResponse(
                    original_request=request,
                    all_extension_numbers_response=pb.ExtensionNumberResponse(
                        base_type_name=message.full_name, extension_number=numbers
                    ),
                )
        except KeyError:
            return _error(request, grpc.StatusCode.NOT_FOUND, f"{_asked(request)!r} is not known here")
        return _error(request, grpc.StatusCode.UNIMPLEMENTED, f"unknown request {kind!r}")

    def _file_of_symbol(self, symbol: str) -> FileDescriptor:
        try:
            return self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            # A method, `<package>.<Service>.<Method>`: the protobuf pool finds services,
            # messages and fields, not methods.
            service_name, _, method = symbol.rpartition(".")
            service = self._pool.FindServiceByName(service_name)
            if method not in service.methods_by_name:
                raise
            return service.file

    def _files_of(
        self, request: pb.ServerReflectionRequest, file: FileDescriptor
    ) -> pb.ServerReflectionResponse:
        """The file and every file it depends on, each serialized once per process."""
        seen: dict[str, FileDescriptor] = {}
        stack = [file]
        while stack:
            current = stack.pop()
            if current.name not in seen:
                seen[current.name] = current
                stack.extend(current.dependencies)
        blobs = [self._serialized(f) for f in seen.values()]
        return pb.ServerReflectionResponse(
            original_request=request,
            file_descriptor_response=pb.FileDescriptorResponse(file_descriptor_proto=blobs),
        )

    def _serialized(self, file: FileDescriptor) -> bytes:
        blob = self._files.get(file.name)
        if blob is None:
            proto = descriptor_pb2.FileDescriptorProto()
            file.CopyToProto(proto)
            blob = self._files[file.name] = proto.SerializeToString()
        return blob


def _asked(request: pb.ServerReflectionRequest) -> str:
    kind = request.WhichOneof("message_request")
    if kind == "file_containing_extension":
        ask = request.file_containing_extension
        return f"{ask.containing_type}({ask.extension_number})"
    return str(getattr(request, kind)) if kind else ""


def _error(
    request: pb.ServerReflectionRequest, code: grpc.StatusCode, message: str
) -> pb.ServerReflectionResponse:
    return pb.ServerReflectionResponse(
        original_request=request,
        error_response=pb.ErrorResponse(error_code=code.value[0], error_message=message[:500]),
    )


def handlers(servicer: ReflectionServicer) -> list[grpc.GenericRpcHandler]:
    """One generic handler per served version, both on the v1 messages."""
    method = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=pb.ServerReflectionRequest.FromString,
        response_serializer=pb.ServerReflectionResponse.SerializeToString,
    )
    return [grpc.method_handlers_generic_handler(name, {METHOD: method}) for name in SERVICE_NAMES]
