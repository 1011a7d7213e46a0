"""An OTLP/gRPC trace receiver that only counts: the far end of a traced server in the
tracing benchmarks, in a process of its own so its CPU is not the server's.

    python -m bench.otlp_sink            # prints `otlp sink on 127.0.0.1:PORT`

On SIGTERM it prints `spans N requests M` and exits.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class Counter(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans = 0
        self.requests = 0

    async def Export(  # noqa: N802 (the generated servicer's method name)
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.requests += 1
        self.spans += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
        return trace_service_pb2.ExportTraceServiceResponse()


async def main() -> None:
    counter = Counter()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(counter, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"otlp sink on 127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)
    print(f"spans {counter.spans} requests {counter.requests}", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
