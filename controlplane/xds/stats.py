"""Envoy's own statistics, as its metrics service sink streams them, turned into heartbeats.

An Envoy node has no agent: its health gates read what Envoy itself counted. Envoy's
`envoy.stat_sinks.metrics_service` sink sends every stats flush as Prometheus metric
families over `MetricsService/StreamMetrics` (cumulative counters, histograms with
cumulative buckets). Between two flushes of one node:

- requests per second: the growth of `http.<prefix>.downstream_rq_total`, summed over
  every HTTP connection manager but the admin interface's, over the time between the
  flushes (their timestamps, else when they arrived);
- error rate: the growth of `downstream_rq_5xx` over that of `downstream_rq_total`
  (0.0 when no request was served: nothing failed);
- p99 latency: from the `downstream_rq_time` histogram's buckets (ms) of the flush,
  interpolated inside the bucket holding the 99th percentile; absent with no samples;
- health: from `server.state` (live: healthy; starting: degraded; draining: unhealthy).

Names are read both as Envoy sends them by default (`http.ingress.downstream_rq_total`)
and with tags as labels (`http.downstream_rq_total` + `envoy_http_conn_manager_prefix`).
A counter that went down means Envoy restarted: the interval starts from zero.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from controlplane.domain.model.fleet import Health, NodeMetrics

ADMIN_PREFIX = "admin"
_STATES = {0: Health.HEALTHY, 1: Health.UNHEALTHY, 2: Health.DEGRADED, 3: Health.DEGRADED}
_PREFIX_LABEL = "envoy_http_conn_manager_prefix"
QUANTILE = 0.99


@dataclass(frozen=True)
class Sample:
    """One flush, reduced to what the heartbeat needs."""

    at: float
    requests: float = 0.0
    errors: float = 0.0
    # Latency histogram (ms): upper bound -> cumulative count, over every listener.
    buckets: dict[float, float] = field(default_factory=dict)
    latency_count: float = 0.0
    state: int | None = None
    seen_requests: bool = False


def _hcm_stat(name: str, labels: dict[str, str], stat: str) -> bool:
    """Is `name` (with `labels`) the HTTP connection manager statistic `stat` of a
    listener other than the admin interface's? (Per-user-agent and other sub-trees,
    `http.<prefix>.<more>.<stat>`, are not counted twice.)"""
    if not (name.startswith("http.") and name.endswith("." + stat)):
        return False
    middle = name[len("http.") : -len(stat) - 1]
    if "." in middle:
        return False
    return (middle or labels.get(_PREFIX_LABEL, "")) != ADMIN_PREFIX


def reduce(families: Iterable[Any], now: float) -> Sample:
    """The figures of one StreamMetricsMessage's metric families."""
    requests = errors = latency_count = 0.0
    buckets: dict[float, float] = {}
    state: int | None = None
    stamp = 0
    seen = False
    for family in families:
        name = family.name
        for metric in family.metric:
            labels = {lp.name: lp.value for lp in metric.label}
            stamp = max(stamp, metric.timestamp_ms)
            if name in ("server.state", "envoy_server_state"):
                state = int(metric.gauge.value)
            elif _hcm_stat(name, labels, "downstream_rq_total"):
                requests += metric.counter.value
                seen = True
            elif _hcm_stat(name, labels, "downstream_rq_5xx"):
                errors += metric.counter.value
            elif _hcm_stat(name, labels, "downstream_rq_time") and metric.HasField("histogram"):
                h = metric.histogram
                latency_count += h.sample_count
                for b in h.bucket:
                    buckets[b.upper_bound] = buckets.get(b.upper_bound, 0.0) + b.cumulative_count
    at = stamp / 1000.0 if stamp else now
    return Sample(at, requests, errors, buckets, latency_count, state, seen)


def percentile(buckets: dict[float, float], count: float, q: float = QUANTILE) -> float | None:
    """The q-quantile of a cumulative histogram, interpolated inside its bucket."""
    if count <= 0:
        return None
    rank = q * count
    lower, below = 0.0, 0.0
    for bound in sorted(buckets):
        cumulative = buckets[bound]
        if cumulative >= rank:
            inside = cumulative - below
            if inside <= 0:
                return bound
            return lower + (bound - lower) * (rank - below) / inside
        lower, below = bound, cumulative
    return lower  # beyond the last finite bucket: the best lower bound known


@dataclass
class NodeStats:
    """One node's stream of flushes; `observe` gives its heartbeat figures.

    A flush may come in several messages (the sink's `batch_size`): a message without
    the request counters leaves the baseline alone, and one without `server.state`
    keeps the health last seen."""

    last: Sample | None = None
    health: Health = Health.UNKNOWN

    def observe(self, message: Any, now: float) -> NodeMetrics:
        sample = reduce(message.envoy_metrics, now)
        if sample.state is not None:
            self.health = _STATES.get(sample.state, Health.UNKNOWN)
        if not sample.seen_requests:
            return NodeMetrics(health=self.health)
        previous, self.last = self.last, sample
        if previous is None:
            return NodeMetrics(health=self.health)
        restarted = sample.requests < previous.requests
        base = Sample(previous.at) if restarted else previous
        elapsed = sample.at - base.at
        requests = sample.requests - base.requests
        errors = max(0.0, sample.errors - base.errors)
        rate = requests / elapsed if elapsed > 0 else None
        error_rate = min(1.0, errors / requests) if requests > 0 else 0.0
        p99 = percentile(sample.buckets, sample.latency_count)
        return NodeMetrics(
            health=self.health,
            error_rate=error_rate,
            p99_latency_ms=p99,
            requests_per_second=rate,
        )
