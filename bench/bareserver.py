"""The floor: a bare grpc.aio WatchBundles server doing the least work possible.

    python -m bench.bareserver --listen 127.0.0.1:0      # prints its ports, serves until killed

Used by `bench.compare` beside etcd and the control plane, so the part of a gap that is
grpc.aio's own and the part that is ours can be told apart. It speaks just enough of
WatchBundles for the same load generator: a bootstrap answers StreamStarted, the current
DesiredState and SnapshotEnd in one message, a resume StreamStarted and a Bookmark (plus
the current state if the client is behind). No auth, no database, no hub, no bookmarks.

A change is published through the control method `/bench.Bare/Publish` (JSON, raw bytes)
with the revision the orchestrator allocated: one DesiredState serialized once and written
straight into every open call from the publishing task (the cheapest send path in
grpc.aio: no per-stream queue or generator). A call whose previous write is still in flight
keeps only the newest payload and sends it when that write completes, so a slow stream
holds up only itself and never has two writes outstanding (level-triggered, like the hub).

Several processes may bind one port (grpc sets SO_REUSEPORT); each has a private control
port of its own, printed at start, because a call on the shared port lands anywhere.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import time
from typing import Any

import grpc
import uvloop

from controlplane.api.watch.v1 import watch_pb2 as pb

# Above any burst the benchmark makes (the defaults, 1,000 soft / 3,000 hard, drop calls).
MAX_PENDING = 65_536
# Freeze the heap once no stream has opened for this long (what the hub does, sooner).
SETTLE_S = 2.0
# The size of a control-plane DesiredState: a digest, a signature and a key id.
DIGEST = "sha256:" + "ab" * 32
SIGNATURE = bytes(64)


class Call:
    __slots__ = ("context", "in_flight", "pending")

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any]):
        self.context = context
        self.in_flight = False
        self.pending: bytes | None = None


class Bare:
    def __init__(self, epoch: str) -> None:
        self.epoch = epoch
        self.revision = 0
        self.desired: pb.WatchEvent | None = None
        self.calls: set[Call] = set()
        self.writers: set[asyncio.Task[None]] = set()
        self.change = b""
        self.counts = {"bootstraps": 0, "resumes": 0, "deliveries": 0, "write_errors": 0}
        self.last_open = 0.0
        self.settled = True

    # -- streams ---------------------------------------------------------------------

    def _hello(self, since: int, epoch: str) -> bytes:
        resume = since > 0 and epoch == self.epoch and since <= self.revision
        mode = pb.STREAM_MODE_RESUME if resume else pb.STREAM_MODE_BOOTSTRAP
        events = [pb.WatchEvent(started=pb.StreamStarted(epoch=self.epoch, mode=mode))]
        if self.desired is not None and since < self.revision:
            events.append(self.desired)
        if resume:
            self.counts["resumes"] += 1
            events.append(pb.WatchEvent(bookmark=pb.Bookmark(revision=self.revision)))
        else:
            self.counts["bootstraps"] += 1
            events.append(pb.WatchEvent(snapshot_end=pb.SnapshotEnd(revision=self.revision)))
        return pb.WatchBundlesResponse(events=events).SerializeToString()

    async def watch(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        req = pb.WatchBundlesRequest.FromString(request)
        call = Call(context)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def ended(_: object) -> None:
            if not done.done():
                done.set_result(None)

        context.add_done_callback(ended)
        self.last_open, self.settled = time.monotonic(), False
        await context.write(self._hello(req.since_revision, req.epoch))
        self.calls.add(call)
        try:
            await done
        finally:
            self.calls.discard(call)

    # -- fan-out ---------------------------------------------------------------------

    def publish(self, revision: int) -> int:
        if revision <= self.revision:
            # Concurrent writers' publishes can cross on the way: the newer state stands.
            return 0
        self.revision = revision
        self.desired = pb.WatchEvent(
            desired=pb.DesiredState(
                revision=revision,
                digest=DIGEST,
                assigned_revision=revision,
                source="selector:env=bench",
                signature=SIGNATURE,
                key_id="bench",
            )
        )
        payload = pb.WatchBundlesResponse(events=[self.desired]).SerializeToString()
        loop = asyncio.get_running_loop()
        for call in self.calls:
            if call.in_flight:
                call.pending = payload
            else:
                call.in_flight = True
                task = loop.create_task(self._drain(call, payload))
                self.writers.add(task)
                task.add_done_callback(self.writers.discard)
        return len(self.calls)

    async def _drain(self, call: Call, payload: bytes) -> None:
        try:
            next_payload: bytes | None = payload
            while next_payload is not None:
                await call.context.write(next_payload)
                self.counts["deliveries"] += 1
                next_payload, call.pending = call.pending, None
        except Exception:  # the call ended under us; its handler removes it
            self.counts["write_errors"] += 1
        finally:
            call.in_flight = False

    async def settle(self) -> None:
        """gc.freeze() once the streams are up, as the hub does: the collector then stops
        walking thousands of long-lived call objects on every allocation burst."""
        while True:
            await asyncio.sleep(0.5)
            if not self.settled and time.monotonic() - self.last_open > SETTLE_S:
                gc.collect()
                gc.freeze()
                self.settled = True

    # -- control ---------------------------------------------------------------------

    async def control_publish(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        body = json.loads(request)
        streams = self.publish(int(body["revision"]))
        return json.dumps({"revision": self.revision, "streams": streams}).encode()

    async def control_stats(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        t = os.times()
        return json.dumps({"open": len(self.calls), "cpu": t.user + t.system, **self.counts}).encode()


async def serve(listen: str, control: str, epoch: str) -> None:
    gc.set_threshold(50_000, 50, 1000)
    bare = Bare(epoch or f"bare-{os.getpid()}")
    options = [
        ("grpc.server.max_pending_requests", MAX_PENDING),
        ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING * 2),
    ]
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "controlplane.watch.v1.WatchService",
                {"WatchBundles": grpc.unary_stream_rpc_method_handler(bare.watch)},
            ),
        )
    )
    port = server.add_insecure_port(listen)
    ctl = grpc.aio.server()
    ctl.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "bench.Bare",
                {
                    "Publish": grpc.unary_unary_rpc_method_handler(bare.control_publish),
                    "Stats": grpc.unary_unary_rpc_method_handler(bare.control_stats),
                },
            ),
        )
    )
    ctl_port = ctl.add_insecure_port(control)
    await server.start()
    await ctl.start()
    settle = asyncio.get_running_loop().create_task(bare.settle())
    print(f"bareserver serving (port {port}) (control {ctl_port})", flush=True)
    try:
        await server.wait_for_termination()
    finally:
        settle.cancel()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listen", default="127.0.0.1:0", help="the shared WatchBundles address")
    p.add_argument("--control", default="127.0.0.1:0", help="this process's own control address")
    p.add_argument(
        "--epoch", default="", help="shared by every process on the port, so a stream may resume on any"
    )
    a = p.parse_args()
    try:
        uvloop.run(serve(a.listen, a.control, a.epoch))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
