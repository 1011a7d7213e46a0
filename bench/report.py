"""Render bench.watch result files as the Markdown tables of docs/benchmarks.md.

    python -m bench.report .bench-out/watch-n1000-*.json .bench-out/watch-n10000-*.json

One column per result file, in the order given.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

Row = tuple[str, str, Callable[[dict[str, Any]], str]]


def _get(d: dict[str, Any], *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def _lat(section: str, which: str) -> Callable[[dict[str, Any]], str]:
    def f(r: dict[str, Any]) -> str:
        q = _get(r, section, which)
        if not q:
            return "-"
        return f"{q['p50_ms']:.1f} / {q['p99_ms']:.1f} / {q['max_ms']:.1f}"

    return f


def _fmt(path: tuple[str, ...], spec: str = "", suffix: str = "") -> Callable[[dict[str, Any]], str]:
    def f(r: dict[str, Any]) -> str:
        v = _get(r, *path)
        if v is None:
            return "-"
        return f"{v:{spec}}{suffix}" if spec else f"{v}{suffix}"

    return f


def _storm(label: str) -> list[Row]:
    s = ("storm_" + label,)
    return [
        (f"storm ({label.replace('_', ', ')}): caught up", "≤ 8 s", _fmt((*s, "caught_up_s"), ".2f", " s")),
        (f"storm ({label.replace('_', ', ')}): bootstraps", "0", _fmt((*s, "bootstraps"), ".0f")),
        (
            f"storm ({label.replace('_', ', ')}): server CPU / reconnect",
            "≤ 500 µs",
            _fmt((*s, "server_us_per_reconnect"), ".0f", " µs"),
        ),
        (f"storm ({label.replace('_', ', ')}): client CPU", "", _fmt((*s, "client_cpu_s"), ".2f", " s")),
    ]


ROWS: list[Row] = [
    ("streams (N)", "", _fmt(("params", "nodes"))),
    ("load generators x channels", "", lambda r: f"{r['params']['workers']} x {r['params']['channels']}"),
    ("establish, burst: all started", "", _fmt(("establish_burst", "all_ready_s"), ".2f", " s")),
    (
        "establish, burst: server CPU / stream",
        "",
        _fmt(("establish_burst", "server_us_per_stream"), ".0f", " µs"),
    ),
    ("establish, burst: errors", "", _fmt(("establish_burst", "errors"))),
    ("establish, paced 200/0.3 s: all started", "", _fmt(("establish_paced", "all_ready_s"), ".2f", " s")),
    (
        "establish, paced: server CPU / stream",
        "",
        _fmt(("establish_paced", "server_us_per_stream"), ".0f", " µs"),
    ),
    ("server RSS, N idle streams", "", _fmt(("idle", "server_rss_mib"), ".0f", " MiB")),
    ("server RSS per idle stream", "≤ 40 KiB", _fmt(("idle", "rss_kib_per_stream"), ".1f", " KiB")),
    ("server CPU idle (bookmarks)", "", _fmt(("idle", "server_cpu_pct"), ".1f", " %")),
    ("server CPU / delivered change", "≤ 30 µs", _fmt(("fleet", "server_us_per_delivery"), ".1f", " µs")),
    (
        "  same, net of per-commit cost",
        "",
        _fmt(("fleet", "server_us_per_delivery_net_of_commit"), ".1f", " µs"),
    ),
    (
        "fleet-wide change, from write: p50 / p99 / max ms",
        "p99 ≤ 1 s (1k: 0.1 s)",
        _lat("fleet", "latency_from_write"),
    ),
    (
        "fleet-wide change, from call: p50 / p99 / max ms",
        "",
        _lat("fleet", "latency_from_call"),
    ),
    ("fleet-wide change, from ack: p50 / p99 / max ms", "", _lat("fleet", "latency_from_ack")),
    ("  AssignBundle call (median)", "", _fmt(("fleet", "assign_rpc_ms_median"), ".0f", " ms")),
    ("  client CPU per round (all generators)", "", _fmt(("fleet", "client_cpu_ms_per_round"), ".0f", " ms")),
    ("  client CPU per received message", "", _fmt(("fleet", "client_us_per_message"), ".1f", " µs")),
    (
        "single-node change, from write: p50 / p99 / max ms",
        "p99 ≤ 20 ms",
        _lat("single", "latency_from_write"),
    ),
    ("single-node change, from call: p50 / p99 / max ms", "", _lat("single", "latency_from_call")),
    ("single-node change, from ack: p50 / p99 / max ms", "", _lat("single", "latency_from_ack")),
    ("  AssignBundle call p99", "", _fmt(("single", "assign_rpc_ms", "p99"), ".1f", " ms")),
    ("  client CPU (share of one core)", "", _fmt(("single", "client_cpu_pct"), ".1f", " %")),
    ("  server CPU per single-node change", "", _fmt(("single", "server_ms_per_change"), ".2f", " ms")),
]


def table(results: list[dict[str, Any]]) -> str:
    rows = list(ROWS)
    labels = sorted({k[6:] for r in results for k in r if k.startswith("storm_")})
    for label in sorted(labels, key=lambda x: (x.split("_")[1], x.split("_")[0])):
        rows += _storm(label)
    head = "| metric | target | " + " | ".join(r["run_id"] for r in results) + " |"
    sep = "|---|---|" + "---|" * len(results)
    body = [f"| {name} | {target} | " + " | ".join(f(r) for r in results) + " |" for name, target, f in rows]
    return "\n".join([head, sep, *body])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", type=Path)
    a = p.parse_args()
    results = [json.loads(f.read_text()) for f in a.files]
    print(table(results))
    for r in results:
        print(f"\n{r['run_id']}: `{r['command']}` (git {r['machine'].get('git_head', '?')})")


if __name__ == "__main__":
    main()
