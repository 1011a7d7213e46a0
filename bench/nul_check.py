"""What the interceptor's parse costs per request, NUL check included
(controlplane/rpc/interceptor.py, `_lenient`), against protobuf's own parse.

    python -m bench.nul_check [--number 20000] [--repeat 7]

Heartbeats are the common request: their optional doubles (and a proto3 optional 0)
serialize with 0x00 bytes, so a scan of the raw bytes alone does not let them skip the
check. Prints the best of `--repeat` runs, in microseconds per request.
"""

from __future__ import annotations

import argparse
import functools
import timeit
from collections.abc import Callable
from typing import Any

from controlplane.api.node.v1 import node_pb2
from controlplane.rpc.interceptor import _lenient


def _requests() -> dict[str, Any]:
    metrics = node_pb2.NodeMetrics(
        health=node_pb2.HEALTH_STATUS_HEALTHY,
        error_rate=0.0,
        p99_latency_ms=35.0,
        cpu_percent=12.5,
        memory_percent=61.0,
        requests_per_second=120.0,
    )
    return {
        "heartbeat": node_pb2.HeartbeatRequest(
            node_id="n-" + "7" * 30, metrics=metrics, applied_digest="sha256:" + "ab" * 32
        ),
        "labels (map)": node_pb2.UpdateNodeLabelsRequest(
            node_id="n-1", labels={f"k{i}": f"v{i}" for i in range(10)}
        ),
    }


def _per_call(call: Callable[[], Any], number: int, repeat: int) -> float:
    return min(timeit.repeat(call, number=number, repeat=repeat)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    print(f"{'request':<16} {'zero byte':>9} {'protobuf µs':>12} {'interceptor µs':>15} {'check µs':>9}")
    for name, message in _requests().items():
        data = message.SerializeToString()
        plain = type(message).FromString
        parse = _lenient(plain)
        assert parse is not None
        base = _per_call(functools.partial(plain, data), args.number, args.repeat)
        total = _per_call(functools.partial(parse, data), args.number, args.repeat)
        zero = "yes" if b"\x00" in data else "no"
        print(f"{name:<16} {zero:>9} {base:>12.2f} {total:>15.2f} {total - base:>9.2f}")


if __name__ == "__main__":
    main()
