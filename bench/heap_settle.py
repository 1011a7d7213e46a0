"""How long the hub's heap settle holds up the event loop (controlplane/watch/heap.py).

    python -m bench.heap_settle                        # 10,000 streams, 200 objects each
    python -m bench.heap_settle --streams 20000 --churn 0.33 --repeat 7

Builds a heap like a serving control plane's: `--streams` streams opened on a real
WatchHub (an in-memory feed, sinks that drop writes), each holding `--per-stream` more
objects that live and die with it (what grpc's call, the handler's coroutine and its
context add in the real server; 10,000 streams at 200 make the ~2M tracked objects of a
10,000-node replica). The heap is then frozen, `--churn` of the streams end and as many
open (stream lifetimes of 10-20 min turn a third of a fleet over every 5 min, so the
quiet period never comes and the hub settles every `gc_refreeze_after`), and one settle
is timed on that heap:

- thaw:    HeapSettler.settle when it thaws: collect what is not frozen, thaw, collect
           everything, freeze (what every settle did before it thawed only with cause);
- no thaw: HeapSettler.settle when every ended stream was freed: collect what is not
           frozen, freeze (frozen objects are not looked at).

Each is repeated `--repeat` times on a fresh churn; medians and maxima are printed, and
the JSON goes to .bench-out/heap_settle.json. A settle runs inside the hub's tick, so its
duration is the loop's stall. Not a test: the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

from bench.common import machine, write_json
from controlplane.domain.kernel.labels import meta_key
from controlplane.domain.model.desired import ChangeKind, DesiredRow, FeedPosition, FeedSnapshot
from controlplane.watch.heap import HeapSettler
from controlplane.watch.hub import HubSettings, WatchHub
from controlplane.watch.stream import WatchStream


class Feed:
    """Nodes only, never a change: the hub reads its snapshot once."""

    def __init__(self, nodes: int):
        self._rows = [
            DesiredRow(meta_key(f"n{i}"), i + 1, "p", ChangeKind.NODE, labels={"env": "prod"})
            for i in range(nodes)
        ]

    async def position(self) -> FeedPosition:
        return FeedPosition(len(self._rows), 0, "bench")

    async def changes(self, after: int, upto: int) -> list[DesiredRow]:
        return []

    async def snapshot(self) -> FeedSnapshot:
        return FeedSnapshot(await self.position(), self._rows)


class Sink:
    async def write(self, payload: bytes) -> None:
        return None


def baggage(n: int) -> list[Any]:
    """`n` small tracked objects, shaped like a call's (dicts, lists, tuples of strings)."""
    return [({"k": i}, [i, str(i)], (i, "v")) if i % 3 == 0 else [i] for i in range(n)]


class Heap:
    def __init__(self, hub: WatchHub, streams: int, per_stream: int):
        self.hub = hub
        self.per_stream = per_stream
        self.streams = streams
        self.next = 0
        self.open: dict[WatchStream, list[Any]] = {}

    def open_one(self) -> None:
        node = f"n{self.next % self.streams}"
        self.next += 1
        stream = self.hub.open(node, 0, self.hub.epoch, Sink())
        self.open[stream] = baggage(self.per_stream)

    def end_one(self) -> None:
        stream = next(iter(self.open))  # the oldest: frozen by an earlier settle
        del self.open[stream]
        stream.abort(Exception("bench"))  # type: ignore[arg-type]
        self.hub.close(stream)


def timed(settle: Callable[[], None]) -> float:
    started = time.perf_counter()
    settle()
    return time.perf_counter() - started


def full() -> None:
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def settle(thaw: bool) -> Callable[[], None]:
    """The settle the hub runs, told to thaw (its backstop due) or not."""
    settler = HeapSettler(5.0, 300.0, 0.0 if thaw else math.inf, now=0.0)
    return lambda: assert_thawed(settler.settle(1.0), thaw)


def assert_thawed(thawed: bool, expected: bool) -> None:
    assert thawed == expected, f"the settle {'did not thaw' if expected else 'thawed'}"


async def measure(streams: int, per_stream: int, churn: float, repeat: int) -> dict[str, Any]:
    hub = WatchHub(Feed(streams), HubSettings())
    await hub.start(background=False)
    heap = Heap(hub, streams, per_stream)
    for _ in range(streams):
        heap.open_one()
    await asyncio.sleep(0)  # the first writes' drain tasks run and end
    turned = int(streams * churn)
    results: dict[str, list[float]] = {"thaw": [], "no thaw": []}
    tracked: list[int] = []
    for _ in range(repeat):
        for kind, runs in results.items():
            full()  # untimed: everything frozen, as after the previous settle
            for _ in range(turned):
                heap.end_one()
                heap.open_one()
            await asyncio.sleep(0)
            tracked.append(len(gc.get_objects()) + gc.get_freeze_count())
            runs.append(timed(settle(kind == "thaw")))
    gc.unfreeze()
    await hub.stop(grace=0)
    return {
        "streams": streams,
        "per_stream": per_stream,
        "churn": churn,
        "tracked_objects": int(statistics.median(tracked)),
        **{
            kind: {"median_s": statistics.median(values), "max_s": max(values), "runs": values}
            for kind, values in results.items()
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=10_000)
    parser.add_argument("--per-stream", type=int, default=200)
    parser.add_argument("--churn", type=float, default=0.33, help="share of streams turned over")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    gc.set_threshold(50_000, 50, 1000)  # the server's (controlplane/bootstrap.py)
    result = asyncio.run(measure(args.streams, args.per_stream, args.churn, args.repeat))
    result["machine"] = machine()
    print(
        f"{result['streams']} streams x {result['per_stream']} objects, {result['churn']:.0%} turned over: "
        f"{result['tracked_objects']:,} tracked objects"
    )
    for kind in ("thaw", "no thaw"):
        r = result[kind]
        print(f"  {kind:7}  median {r['median_s'] * 1000:7.1f} ms   max {r['max_s'] * 1000:7.1f} ms")
    print(f"  -> {write_json('heap_settle.json', result)}")


if __name__ == "__main__":
    main()
