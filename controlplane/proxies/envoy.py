"""Envoy from files: the overlay the driver starts it with, its validator, its admin API.

The bundle's `envoy.yaml` is a full bootstrap, read unchanged; the driver adds, through
`--config-yaml` (merged over it by Envoy), the admin address and the node: its id is the
control plane's node id (the notion of a node an xDS server shares) and its metadata
names the bundle digest, which `/server_info` then shows. Each change starts a new Envoy
process (hot restart: a new `--restart-epoch` takes the listening sockets over from the
previous one, which drains and exits), with its working directory in the bundle, so
relative paths in a bundle are relative to its `envoy.yaml`.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from controlplane.proxies.binaries import Binary
from controlplane.proxies.http import Address

MAIN = "envoy.yaml"
BUNDLE_METADATA_KEY = "controlplane.bundle"
BASE_ID_FILE = "envoy.base-id"
# The statistics a heartbeat needs, and nothing else (the full /stats is thousands of lines).
_STATS_FILTER = r"^(server\.(hot_restart_epoch|state)|http\.[^.]+\.downstream_rq_(completed|5xx|time))$"
STATS_PATH = "/stats?usedonly&histogram_buckets=detailed&filter=" + urllib.parse.quote(_STATS_FILTER, safe="")


def overlay(*, admin: Address, node_id: str, digest: str) -> str:
    """The `--config-yaml` the driver merges over the bundle's bootstrap (JSON is YAML)."""
    return json.dumps(
        {
            "admin": {"address": {"socket_address": {"address": admin.host, "port_value": admin.port}}},
            "node": {"id": node_id or "unregistered", "metadata": {BUNDLE_METADATA_KEY: digest}},
        },
        separators=(",", ":"),
    )


def validate_argv(binary: Binary, main: Path, overlay_yaml: str) -> list[str]:
    return [
        str(binary.path),
        "--mode",
        "validate",
        "-c",
        str(main),
        "--config-yaml",
        overlay_yaml,
        "-l",
        "error",
    ]


def run_argv(
    binary: Binary,
    main: Path,
    overlay_yaml: str,
    *,
    epoch: int,
    run_dir: Path,
    base_id: int | None,
    drain_seconds: int,
    log_path: Path,
) -> list[str]:
    """Epoch 0 picks a free shared-memory base id and writes it down; later epochs use it
    to find their parent. Without a parent alive (it died), an epoch starts on its own."""
    argv = [
        str(binary.path),
        "-c",
        str(main),
        "--config-yaml",
        overlay_yaml,
        "--restart-epoch",
        str(epoch),
        "--drain-time-s",
        str(drain_seconds),
        # The parent exits this long after the child took over: its drain, plus a margin.
        "--parent-shutdown-time-s",
        str(drain_seconds + 2),
        "--skip-hot-restart-on-no-parent",
        "--log-path",
        str(log_path),
        "-l",
        "warning",
    ]
    if base_id is None:
        argv += ["--use-dynamic-base-id", "--base-id-path", str(run_dir / BASE_ID_FILE)]
    else:
        argv += ["--base-id", str(base_id)]
    return argv


_LOG_PREFIX = re.compile(r"\[\d{4}-[^]]*\]\[\d+\]\[(\w+)\]\[\w+\] \[[^]]*\] ", re.M)


def words(output: str) -> str:
    """Envoy's log lines without their timestamp, thread and source location."""
    return _LOG_PREFIX.sub(lambda m: f"[{m.group(1)}] ", output)


def served_digest(server_info: str) -> tuple[str, str, int]:
    """(bundle digest in the node metadata, server state, restart epoch) of /server_info."""
    data = json.loads(server_info)
    node = data.get("node") or {}
    digest = str((node.get("metadata") or {}).get(BUNDLE_METADATA_KEY, ""))
    epoch = int((data.get("command_line_options") or {}).get("restart_epoch", 0))
    return digest, str(data.get("state", "")), epoch


@dataclass
class Stats:
    epoch: int | None = None
    # 0 LIVE, 1 DRAINING, 2 PRE_INITIALIZING, 3 INITIALIZING (server.state).
    state: int | None = None
    completed: int = 0
    errors: int = 0
    # Request times of the last stats flush interval: bucket upper bound (ms) -> count.
    latency: dict[float, float] = field(default_factory=dict)


_BUCKET = re.compile(r"(-?[0-9.e+]+),(-?[0-9.e+]+):(\d+)")


def parse_stats(text: str) -> Stats:
    """The filtered /stats text: counters and gauges as `name: value`, histograms as a
    block with `intervals=lower,width:count, ...`. The admin's own listener is left out."""
    stats = Stats()
    histogram = ""
    for line in text.splitlines():
        if line.startswith("  "):
            item = line.strip()
            # The last flush interval's buckets (Envoy flushes every 5 s by default):
            # what a percentile of recent requests is computed from.
            if histogram and item.startswith("intervals="):
                for lower, width, count in _BUCKET.findall(item):
                    key = float(lower) + float(width)
                    stats.latency[key] = stats.latency.get(key, 0) + int(count)
            continue
        name, _, value = line.partition(":")
        value = value.strip()
        histogram = (
            name if not value and name.endswith("downstream_rq_time") and ".admin." not in name else ""
        )
        if not value or ".admin." in name:
            continue
        if name == "server.hot_restart_epoch":
            stats.epoch = int(value)
        elif name == "server.state":
            stats.state = int(value)
        elif name.endswith(".downstream_rq_completed"):
            stats.completed += int(value)
        elif name.endswith(".downstream_rq_5xx"):
            stats.errors += int(value)
    return stats
