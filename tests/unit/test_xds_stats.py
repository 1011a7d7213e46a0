"""Heartbeat figures from Envoy's metrics service messages."""

from __future__ import annotations

from typing import Any

import pytest

from controlplane.api.third_party.envoy.service.metrics.v3 import metrics_service_pb2 as ms
from controlplane.api.third_party.io.prometheus.client import metrics_pb2 as prom
from controlplane.domain.model.fleet import Health
from controlplane.xds.stats import NodeStats, percentile

BOUNDS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000)


def flush(
    at_ms: int,
    total: dict[str, float],
    errors: dict[str, float],
    times: dict[str, list[float]],
    state: int = 0,
) -> Any:
    msg = ms.StreamMetricsMessage()
    msg.identifier.node.id = "n1"
    gauge = msg.envoy_metrics.add(name="server.state", type=prom.GAUGE)
    gauge.metric.add(timestamp_ms=at_ms).gauge.value = state
    for prefix, value in total.items():
        fam = msg.envoy_metrics.add(name=f"http.{prefix}.downstream_rq_total", type=prom.COUNTER)
        fam.metric.add(timestamp_ms=at_ms).counter.value = value
    for prefix, value in errors.items():
        fam = msg.envoy_metrics.add(name=f"http.{prefix}.downstream_rq_5xx", type=prom.COUNTER)
        fam.metric.add(timestamp_ms=at_ms).counter.value = value
    for prefix, samples in times.items():
        fam = msg.envoy_metrics.add(name=f"http.{prefix}.downstream_rq_time", type=prom.HISTOGRAM)
        h = fam.metric.add(timestamp_ms=at_ms).histogram
        h.sample_count = len(samples)
        for bound in BOUNDS:
            h.bucket.add(upper_bound=bound, cumulative_count=sum(1 for s in samples if s <= bound))
    return ms.StreamMetricsMessage.FromString(msg.SerializeToString())


def test_rates_errors_and_p99_come_from_the_growth_between_flushes() -> None:
    node = NodeStats()
    first = node.observe(
        flush(10_000, {"ingress": 100, "admin": 50}, {"ingress": 1}, {"ingress": [2] * 100}), 0
    )
    assert first.health is Health.HEALTHY and first.requests_per_second is None and first.error_rate is None
    # 5 s later: 200 more requests, 20 of them 5xx; the slow ones took ~400 ms. (Envoy
    # sends histograms per flush interval, counters cumulatively.)
    times = [3.0] * 180 + [400.0] * 20
    m = node.observe(flush(15_000, {"ingress": 300, "admin": 90}, {"ingress": 21}, {"ingress": times}), 0)
    assert m.requests_per_second == pytest.approx(40.0)  # the admin interface's requests do not count
    assert m.error_rate == pytest.approx(0.1)
    assert m.p99_latency_ms is not None and 250 < m.p99_latency_ms <= 500
    assert (
        node.observe(flush(16_000, {"ingress": 300}, {"ingress": 21}, {"ingress": []}), 0).p99_latency_ms
        is None
    )


def test_no_traffic_no_errors_and_no_p99() -> None:
    node = NodeStats()
    node.observe(flush(1000, {"ingress": 5}, {}, {"ingress": [1.0] * 5}), 0)
    m = node.observe(flush(2000, {"ingress": 5}, {}, {"ingress": []}), 0)
    assert (m.requests_per_second, m.error_rate, m.p99_latency_ms) == (0.0, 0.0, None)


def test_health_follows_the_server_state_and_a_restart_starts_from_zero() -> None:
    node = NodeStats()
    node.observe(flush(1000, {"ingress": 1000}, {"ingress": 10}, {}), 0)
    m = node.observe(flush(3000, {"ingress": 40}, {"ingress": 4}, {}, state=3), 0)
    assert m.health is Health.DEGRADED
    assert m.requests_per_second == pytest.approx(20.0) and m.error_rate == pytest.approx(0.1)
    assert node.observe(flush(4000, {"ingress": 40}, {}, {}, state=1), 0).health is Health.UNHEALTHY


def test_percentile_interpolates_inside_the_bucket() -> None:
    assert percentile({10.0: 50.0, 20.0: 100.0}, 100, 0.5) == pytest.approx(10.0)
    assert percentile({10.0: 0.0, 20.0: 100.0}, 100, 0.99) == pytest.approx(19.9)
    assert percentile({10.0: 10.0}, 100, 0.99) == 10.0  # beyond the last finite bucket
    assert percentile({}, 0) is None


def test_a_flush_split_over_messages_keeps_its_baseline_and_health() -> None:
    node = NodeStats()
    node.observe(flush(1000, {"ingress": 10}, {"ingress": 0}, {}), 0)
    only_gauges = ms.StreamMetricsMessage()
    only_gauges.envoy_metrics.add(
        name="cluster.x.upstream_cx_active", type=prom.GAUGE
    ).metric.add().gauge.value = 1
    assert node.observe(only_gauges, 0).health is Health.HEALTHY  # the health last seen
    m = node.observe(flush(2000, {"ingress": 20}, {"ingress": 5}, {}), 0)
    assert m.requests_per_second == pytest.approx(10.0) and m.error_rate == pytest.approx(0.5)
