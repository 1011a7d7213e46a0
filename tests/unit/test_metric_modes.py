"""With `serve --workers N` the metrics endpoint aggregates the processes' files
(prometheus_client's multiprocess mode). A gauge left on the default mode ("all") is
published once per pid instead of as one server's value."""

from __future__ import annotations

import importlib
import pkgutil

from prometheus_client import Gauge

import controlplane


def server_gauges() -> dict[str, Gauge]:
    found: dict[str, Gauge] = {}
    for module in pkgutil.walk_packages(controlplane.__path__, "controlplane."):
        if module.name.startswith("controlplane.api.") or module.name.endswith(".__main__"):
            continue  # generated protobuf code; entry points that run on import
        for value in vars(importlib.import_module(module.name)).values():
            if isinstance(value, Gauge):
                found[value._name] = value
    return found


def test_every_gauge_says_how_the_workers_values_combine() -> None:
    gauges = server_gauges()
    assert {"controlplane_watch_streams_open", "controlplane_xds_streams_open"} <= set(gauges)
    per_pid = sorted(name for name, gauge in gauges.items() if gauge._multiprocess_mode == "all")
    assert per_pid == [], f"gauges published per process, not as one server's value: {per_pid}"
