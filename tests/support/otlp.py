"""A real OTLP/gRPC trace receiver: the collector's `TraceService/Export`, written with
opentelemetry-proto (no collector is packaged here). Servers and agents export to it
exactly as to a collector; tests look at the spans it received."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from tests.support.eventually import eventually


@dataclass(frozen=True)
class Span:
    service: str
    instance: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int
    attributes: dict[str, Any]
    # (trace id, span id) of each link.
    links: tuple[tuple[str, str], ...]


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


@dataclass
class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    spans: list[Span] = field(default_factory=list)
    requests: int = 0

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.requests += 1
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                for s in scope.spans:
                    self.spans.append(
                        Span(
                            service=str(resource.get("service.name", "")),
                            instance=str(resource.get("service.instance.id", "")),
                            name=s.name,
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_id=s.parent_span_id.hex(),
                            kind=s.kind,
                            attributes={a.key: _value(a.value) for a in s.attributes},
                            links=tuple((link.trace_id.hex(), link.span_id.hex()) for link in s.links),
                        )
                    )
        return trace_service_pb2.ExportTraceServiceResponse()

    def named(self, name: str, where: Callable[[Span], bool] = lambda _: True) -> list[Span]:
        return [s for s in self.spans if s.name == name and where(s)]

    def in_trace(self, trace_id: str) -> Iterator[Span]:
        return (s for s in self.spans if s.trace_id == trace_id)

    async def wait_for(
        self, name: str, where: Callable[[Span], bool] = lambda _: True, count: int = 1, timeout: float = 30
    ) -> list[Span]:
        async def check() -> list[Span]:
            found = self.named(name, where)
            assert len(found) >= count, f"{len(found)} of {count} {name!r} spans; have {self.summary()}"
            return found

        return await eventually(check, timeout=timeout, what=f"{count} {name} span(s)")

    def summary(self) -> str:
        names: dict[str, int] = {}
        for s in self.spans:
            names[s.name] = names.get(s.name, 0) + 1
        return ", ".join(f"{k}={v}" for k, v in sorted(names.items()))


class OtlpReceiver:
    """The receiver on 127.0.0.1, port 0 read back: `endpoint` is what to export to."""

    def __init__(self) -> None:
        self.receiver = Receiver()
        self.server = grpc.aio.server()
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            self.receiver, self.server
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> OtlpReceiver:
        await self.server.start()
        return self

    async def stop(self) -> None:
        await self.server.stop(0)
