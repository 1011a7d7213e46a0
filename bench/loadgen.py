"""One load-generator process: holds a slice of the benchmark nodes' WatchBundles streams.

Started by `bench.watch` (or `bench.stall`), never by hand. It reads one JSON command per
line on stdin and answers each with one JSON line on stdout. Every DesiredState received is
recorded as (revision → wall-clock receipt times), so the orchestrator can compute
commit-to-receipt latency per revision across all workers.

Streams are spread round-robin over `--channels` channels; each channel is its own HTTP/2
connection (local subchannel pool plus a distinct channel argument), since grpc otherwise
shares one connection between channels with equal arguments.

Commands (all answered with `{"id": ..., ...}`):
  open   {at, since: "zero"|"cursor", batch, interval, timeout, retry: "agent"|"none", fresh_channels}
         start every stream (at wall time `at`; `batch` streams every `interval` s when
         paced) and answer once every stream is caught up (snapshot_end or resume
         bookmark), or failed for good (retry "none"), or at `timeout`.
  storm  {at, kind: "streams"|"channels", timeout}  cancel every stream at `at` (and, for
         "channels", close every connection), reopen at once from each stream's cursor and
         epoch; answers like open.
  wait   {rev, need, timeout}  answer when `need` streams (-1: all) have received `rev`.
  receipts {revs}  receipt times per revision.
  digests  {}      the digest each stream currently holds, counted.
  close  {}  cancel every stream and wait for the tasks to end.
  stats  {}  counters.
  quit   {}
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import json
import os
import random
import sys
import time
from typing import Any

import grpc
import uvloop

from bench.common import WATCH_METHOD
from controlplane.api.watch.v1 import watch_pb2 as pb

EOF = grpc.aio.EOF


class Stream:
    __slots__ = (
        "attempts",
        "call_task",
        "channel",
        "cursor",
        "digest",
        "epoch",
        "failed",
        "metadata",
        "mode",
        "node_id",
        "ready",
        "t_failed",
        "t_open",
        "t_ready",
        "t_started",
    )

    def __init__(self, node_id: str, credential: str, channel: int):
        self.node_id = node_id
        self.metadata = (("authorization", f"Bearer {credential}"),) if credential else ()
        self.channel = channel
        self.cursor = 0
        self.epoch = ""
        self.digest = ""
        self.mode: pb.StreamMode.ValueType = pb.STREAM_MODE_UNSPECIFIED
        self.ready = False
        self.failed = ""
        self.attempts = 0
        self.t_open = 0.0
        self.t_started = 0.0
        self.t_ready = 0.0
        self.t_failed = 0.0
        self.call_task: asyncio.Task[None] | None = None


class Worker:
    def __init__(self, target: str, nodes: list[dict[str, str]], channels: int):
        self.target = target
        self.n_channels = max(1, min(channels, len(nodes)))
        self.generation = 0
        self.channels: list[grpc.aio.Channel] = []
        self.methods: list[Any] = []
        self._make_channels()
        self.streams = [
            # A node token where the server issues them, else the node credential.
            Stream(n["node_id"], n.get("token") or n.get("credential", ""), i % self.n_channels)
            for i, n in enumerate(nodes)
        ]
        self.receipts: dict[int, list[float]] = collections.defaultdict(list)
        self.waiters: dict[int, tuple[int, asyncio.Future[None]]] = {}
        self.unready = 0
        self.all_ready: asyncio.Future[None] | None = None
        self.retry = "agent"
        self.messages = 0
        self.events = 0
        self.received = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.drops: collections.Counter[str] = collections.Counter()
        self.details: collections.Counter[str] = collections.Counter()
        self.resets = 0

    def _make_channels(self) -> None:
        self.generation += 1
        self.channels = [
            grpc.aio.insecure_channel(
                self.target,
                options=[
                    ("grpc.use_local_subchannel_pool", 1),
                    ("bench.channel", f"{os.getpid()}-{self.generation}-{i}"),
                ],
            )
            for i in range(self.n_channels)
        ]
        self.methods = [
            ch.unary_stream(
                WATCH_METHOD,
                request_serializer=pb.WatchBundlesRequest.SerializeToString,
                response_deserializer=pb.WatchBundlesResponse.FromString,
            )
            for ch in self.channels
        ]

    # -- one stream ------------------------------------------------------------------

    def _on_message(self, s: Stream, msg: pb.WatchBundlesResponse, now: float) -> bool:
        """Record one response; True if it ends with a closing bookmark."""
        self.messages += 1
        closing = False
        for ev in msg.events:
            self.events += 1
            kind = ev.WhichOneof("event")
            if kind == "desired":
                d = ev.desired
                rev = d.revision
                s.cursor = rev
                s.digest = d.digest
                times = self.receipts[rev]
                times.append(now)
                self.received += 1
                w = self.waiters.get(rev)
                if w is not None and len(times) >= w[0] and not w[1].done():
                    w[1].set_result(None)
            elif kind == "bookmark":
                b = ev.bookmark
                s.cursor = b.revision
                closing = b.closing
                if not s.ready:
                    self._mark_ready(s, now)
            elif kind == "snapshot_end":
                s.cursor = ev.snapshot_end.revision
                if not s.ready:
                    self._mark_ready(s, now)
            elif kind == "started":
                st = ev.started
                s.epoch = st.epoch
                s.mode = st.mode
                s.t_started = now
            elif kind == "reset":
                self.resets += 1
        return closing

    def _mark_ready(self, s: Stream, now: float) -> None:
        s.ready = True
        s.t_ready = now
        self.unready -= 1
        if self.unready <= 0 and self.all_ready is not None and not self.all_ready.done():
            self.all_ready.set_result(None)

    def _mark_failed(self, s: Stream, code: str) -> None:
        s.failed = code
        s.t_failed = time.time()
        self.unready -= 1
        if self.unready <= 0 and self.all_ready is not None and not self.all_ready.done():
            self.all_ready.set_result(None)

    async def _run(self, s: Stream, resume: bool, delay: float) -> None:
        if delay > 0:
            await asyncio.sleep(delay)
        failures = 0
        while True:
            since, epoch = (s.cursor, s.epoch) if resume else (0, "")
            s.attempts += 1
            s.t_open = s.t_open or time.time()
            call = self.methods[s.channel](
                pb.WatchBundlesRequest(node_id=s.node_id, since_revision=since, epoch=epoch),
                metadata=s.metadata,
            )
            got_any = False
            closing = False
            try:
                while True:
                    msg = await call.read()
                    if msg is EOF:
                        break
                    got_any = True
                    closing = self._on_message(s, msg, time.time())
                code = "OK"
            except grpc.aio.AioRpcError as e:
                code = e.code().name
                if not got_any:
                    self.details[f"{code}: {e.details()}"[:120]] += 1
            if got_any:
                self.drops[code] += 1
            else:
                self.errors[code] += 1
            if not s.ready and self.retry == "none":
                self._mark_failed(s, code)
                return
            # The agent's policy: resume from the cursor, full-jitter backoff 0.5 s → 30 s,
            # at once after a closing bookmark.
            resume = s.cursor > 0
            if closing:
                failures = 0
                continue
            failures = 0 if got_any else failures + 1
            await asyncio.sleep(random.uniform(0, min(30.0, 0.5 * 2 ** max(0, failures - 1))))

    # -- commands --------------------------------------------------------------------

    async def _start(
        self, at: float, resume: bool, batch: int, interval: float, retry: str, within: float
    ) -> dict[str, Any]:
        self.retry = retry
        loop = asyncio.get_running_loop()
        self.all_ready = loop.create_future()
        self.unready = len(self.streams)
        errors0, drops0, msgs0 = self.errors.copy(), self.drops.copy(), self.messages
        for s in self.streams:
            s.ready, s.failed, s.attempts = False, "", 0
            s.t_open, s.t_started, s.t_ready, s.t_failed = 0.0, 0.0, 0.0, 0.0
        await asyncio.sleep(max(0.0, at - time.time()))
        t_start = time.time()
        for i, s in enumerate(self.streams):
            delay = (i // batch) * interval if batch > 0 else 0.0
            s.call_task = loop.create_task(self._run(s, resume, delay))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.all_ready), within)
        t_end = time.time()
        return self._open_report(t_start, t_end, errors0, drops0, msgs0)

    def _open_report(
        self,
        t_start: float,
        t_end: float,
        errors0: collections.Counter[str],
        drops0: collections.Counter[str],
        msgs0: int,
    ) -> dict[str, Any]:
        ready = [s for s in self.streams if s.ready]
        failed = collections.Counter(s.failed for s in self.streams if s.failed)
        modes = collections.Counter(pb.StreamMode.Name(s.mode) for s in ready)
        return {
            "t_start": t_start,
            "t_end": t_end,
            "n": len(self.streams),
            "ready": len(ready),
            "failed": dict(failed),
            "pending": len(self.streams) - len(ready) - sum(failed.values()),
            "ready_times": [s.t_ready for s in ready],
            "started_after": [s.t_started - t_start for s in ready],
            "failed_after": [s.t_failed - t_start for s in self.streams if s.failed],
            "details": dict(self.details),
            "modes": dict(modes),
            "retries": sum(max(0, s.attempts - 1) for s in self.streams),
            "errors": dict(self.errors - errors0),
            "drops": dict(self.drops - drops0),
            "messages": self.messages - msgs0,
        }

    async def cmd_open(self, c: dict[str, Any]) -> dict[str, Any]:
        if c.get("fresh_channels"):
            await self._close_channels()
            self._make_channels()
        return await self._start(
            c.get("at", 0.0),
            c.get("since", "zero") == "cursor",
            int(c.get("batch", 0)),
            float(c.get("interval", 0.0)),
            c.get("retry", "agent"),
            float(c.get("timeout", 60.0)),
        )

    async def cmd_storm(self, c: dict[str, Any]) -> dict[str, Any]:
        at = c["at"]
        await asyncio.sleep(max(0.0, at - time.time()))
        t_drop = time.time()
        await self._cancel_all()
        if c.get("kind", "streams") == "channels":
            await self._close_channels()
            self._make_channels()
        report = await self._start(0.0, True, 0, 0.0, "agent", float(c.get("timeout", 60.0)))
        report["t_drop"] = t_drop
        return report

    async def _cancel_all(self) -> None:
        tasks = [s.call_task for s in self.streams if s.call_task is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in self.streams:
            s.call_task = None

    async def _close_channels(self) -> None:
        await asyncio.gather(*(ch.close(None) for ch in self.channels), return_exceptions=True)

    async def cmd_wait(self, c: dict[str, Any]) -> dict[str, Any]:
        rev, need = int(c["rev"]), int(c.get("need", -1))
        if need < 0:
            need = sum(1 for s in self.streams if s.ready)
        times = self.receipts[rev]
        if len(times) < need:
            fut = asyncio.get_running_loop().create_future()
            self.waiters[rev] = (need, fut)
            try:
                await asyncio.wait_for(fut, float(c.get("timeout", 30.0)))
            except TimeoutError:
                pass
            finally:
                self.waiters.pop(rev, None)
        return {"rev": rev, "count": len(times), "need": need}

    async def cmd_receipts(self, c: dict[str, Any]) -> dict[str, Any]:
        return {"receipts": {str(r): self.receipts.get(int(r), []) for r in c["revs"]}}

    async def cmd_digests(self, c: dict[str, Any]) -> dict[str, Any]:
        return {"digests": dict(collections.Counter(s.digest for s in self.streams))}

    async def cmd_close(self, c: dict[str, Any]) -> dict[str, Any]:
        await self._cancel_all()
        if c.get("channels"):
            await self._close_channels()
            self._make_channels()
        return {"closed": len(self.streams)}

    async def cmd_stats(self, c: dict[str, Any]) -> dict[str, Any]:
        return {
            "messages": self.messages,
            "events": self.events,
            "received": self.received,
            "errors": dict(self.errors),
            "drops": dict(self.drops),
            "resets": self.resets,
            "ready": sum(1 for s in self.streams if s.ready),
            "cpu": time.process_time(),
        }


async def serve(target: str, nodes: list[dict[str, str]], channels: int) -> None:
    # Channels belong to the loop they are created on: build them inside it.
    worker = Worker(target, nodes, channels)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out_lock = asyncio.Lock()
    running: set[asyncio.Task[None]] = set()

    async def handle(c: dict[str, Any]) -> None:
        try:
            result = await getattr(worker, "cmd_" + c["cmd"])(c)
        except Exception as e:  # report, keep serving
            result = {"error": repr(e)}
        line = json.dumps({"id": c.get("id"), **result}) + "\n"
        async with out_lock:
            sys.stdout.write(line)
            sys.stdout.flush()

    while True:
        raw = await reader.readline()
        if not raw:
            break
        c = json.loads(raw)
        if c["cmd"] == "quit":
            break
        task = loop.create_task(handle(c))
        running.add(task)
        task.add_done_callback(running.discard)
    await worker._cancel_all()
    await worker._close_channels()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--target", required=True)
    p.add_argument("--nodes-file", required=True, help="JSON list of {node_id, credential}")
    p.add_argument("--channels", type=int, default=1)
    a = p.parse_args()
    with open(a.nodes_file) as f:
        nodes = json.load(f)
    # The generator is a measuring instrument: keep its own collector out of the way of
    # thousands of long-lived call objects (the same tuning the server does).
    gc.set_threshold(50_000, 50, 1000)
    uvloop.run(serve(a.target, nodes, a.channels))


if __name__ == "__main__":
    main()
