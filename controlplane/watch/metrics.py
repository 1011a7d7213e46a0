"""Prometheus metrics of the watch. Counters that would tick once per delivery are
incremented once per fan-out batch instead: a lock per delivery would cost as much as
the delivery."""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram

from controlplane.domain.model.fleet import Node, StatusReport

log = logging.getLogger(__name__)

# multiprocess_mode: how `serve --workers`' aggregate endpoint combines its processes'
# values (prometheus_client's multiprocess mode; ignored with one process).
STREAMS_OPEN = Gauge(
    "controlplane_watch_streams_open", "WatchBundles streams currently open.", multiprocess_mode="livesum"
)
STREAMS_LAGGING = Gauge(
    "controlplane_watch_streams_lagging",
    "Streams whose queue overflowed and that are catching up.",
    multiprocess_mode="livesum",
)
LAGGING_TOTAL = Counter(
    "controlplane_watch_stream_overflows_total",
    "Times a stream's pending writes overflowed and it was marked lagging.",
)
BOOTSTRAPS = Counter("controlplane_watch_bootstraps_total", "Streams served a full bootstrap.")
RESUMES = Counter("controlplane_watch_resumes_total", "Streams resumed from the node's cursor.")
RESETS = Counter("controlplane_watch_resets_total", "Resumes refused with a reset, by reason.", ["reason"])
BOOKMARKS = Counter("controlplane_watch_bookmarks_total", "Bookmarks sent (liveness and closing).")
DELIVERIES = Counter("controlplane_watch_deliveries_total", "DesiredState events queued to streams.")
NACKS = Counter("controlplane_fleet_reports_failed_total", "FAILED status reports (NACKs) recorded on nodes.")
REJECTED = Counter(
    "controlplane_watch_streams_rejected_total", "Stream opens refused before start, by reason.", ["reason"]
)
FANOUT_LATENCY = Histogram(
    "controlplane_watch_fanout_latency_seconds",
    "From the write of a revision to its events being queued on every affected stream.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
HEAD = Gauge(
    "controlplane_watch_head_revision", "Newest revision the hub has read.", multiprocess_mode="livemax"
)
FLOOR = Gauge(
    "controlplane_watch_floor_revision",
    "Oldest revision a resume can start from.",
    multiprocess_mode="livemax",
)
FEED_ERRORS = Counter("controlplane_watch_feed_errors_total", "Failed reads of the desired-state log.")


def count_nack(node: Node, report: StatusReport) -> None:
    """A node refused a bundle: counted, and logged with its reason."""
    NACKS.inc()
    log.warning(
        "node %s rejected %s at revision %d: %s",
        node.id,
        report.digest,
        report.revision,
        report.error,
        # Said here: the report's batch is written for many callers (group_commit.py).
        extra={"fields": {"node_id": node.id, "project": node.project}},
    )
