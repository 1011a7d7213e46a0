"""A bare grpc.aio server speaking just enough WatchBundles to study the burst stall.

    python -m bench.stallserver --port 0 [--max-pending N]

Without `--max-pending` it runs with grpc's default server options (the configuration the
original probe used); with it, it sets the same two options `controlplane serve` sets
(rpc/server.py `server_options`: soft limit N, hard limit 2N). Each WatchBundles call gets
one message (started + snapshot_end, as a bootstrap of an empty node would) and is then
held open until the client goes away. No auth, no database: only the accept path.

`/bench.Stall/Stats` (unary, raw bytes) answers JSON: handler entries so far, open calls,
and the process's CPU seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

import grpc
import uvloop

from controlplane.api.watch.v1 import watch_pb2 as pb

HELLO = pb.WatchBundlesResponse(
    events=[
        pb.WatchEvent(started=pb.StreamStarted(stream_id="s", epoch="e", mode=pb.STREAM_MODE_BOOTSTRAP)),
        pb.WatchEvent(snapshot_end=pb.SnapshotEnd(revision=1)),
    ]
).SerializeToString()


class Counters:
    entered = 0
    open = 0


async def watch(request: bytes, context: grpc.aio.ServicerContext) -> None:
    Counters.entered += 1
    Counters.open += 1
    try:
        await context.write(HELLO)
        await asyncio.Event().wait()
    finally:
        Counters.open -= 1


async def stats(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    t = os.times()
    return json.dumps({"entered": Counters.entered, "open": Counters.open, "cpu": t.user + t.system}).encode()


async def serve(port: int, max_pending: int) -> None:
    options: list[tuple[str, Any]] = []
    if max_pending:
        options = [
            ("grpc.server.max_pending_requests", max_pending),
            ("grpc.server.max_pending_requests_hard_limit", max_pending * 2),
        ]
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "controlplane.watch.v1.WatchService",
                {"WatchBundles": grpc.unary_stream_rpc_method_handler(watch)},
            ),
            grpc.method_handlers_generic_handler(
                "bench.Stall", {"Stats": grpc.unary_unary_rpc_method_handler(stats)}
            ),
        )
    )
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"stallserver serving (port {bound}) options={options}", flush=True)
    await server.wait_for_termination()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--max-pending", type=int, default=0, help="0: grpc defaults (1000 soft, 3000 hard)")
    a = p.parse_args()
    try:
        uvloop.run(serve(a.port, a.max_pending))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
