"""Health gates and canary analysis on what heartbeats actually carry: a metric a node
did not report is absent, and absence fails a gate and is no canary sample."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from typing import Any

from controlplane.domain.model.facts import NodeFacts
from controlplane.domain.model.fleet import Health, HeartbeatRecord, NodeMetrics
from controlplane.domain.model.rollouts import CanaryAnalysis, Gates
from controlplane.domain.rollouts import canary, gates
from tests.support.rollouts import HEALTHY, NEW, OLD, T0

S = timedelta(seconds=1)
STALE = 30 * S
LIMITS = Gates(max_error_rate=0.05, max_p99_latency_ms=100, max_cpu_percent=80, max_memory_percent=90)


def facts(metrics: NodeMetrics, digest: str = NEW) -> NodeFacts:
    beat = HeartbeatRecord(T0 + 2 * S, metrics, digest)
    return NodeFacts("n-1", True, applied_digest=digest, reported_at=T0 + S, heartbeat=beat)


def problem(g: Gates, metrics: NodeMetrics) -> str:
    return gates.node_problem(g, facts(metrics), NEW, T0 + S, T0 + 3 * S, STALE)


def test_a_limit_on_a_metric_the_node_did_not_report_fails_naming_it() -> None:
    assert problem(LIMITS, HEALTHY) == ""
    for name in ("error_rate", "p99_latency_ms", "cpu_percent", "memory_percent"):
        absent: dict[str, Any] = {name: None}
        without = replace(HEALTHY, **absent)
        assert problem(LIMITS, without) == f"no {name} reported"
    # Only the metrics the gates limit are needed; a reported 0.0 is a value, not a gap.
    only_errors = NodeMetrics(Health.HEALTHY, error_rate=0.0)
    assert problem(Gates(max_error_rate=0.05), only_errors) == ""
    assert problem(Gates(max_p99_latency_ms=100), only_errors) == "no p99_latency_ms reported"


def test_require_healthy_fails_on_unknown_health() -> None:
    assert problem(Gates(), NodeMetrics()) == "no health reported"
    assert problem(Gates(), NodeMetrics(Health.DEGRADED, error_rate=0.0)) == "health degraded"
    assert (
        problem(Gates(require_healthy=False, max_error_rate=0.05), NodeMetrics()) == "no error_rate reported"
    )


def test_a_step_of_nodes_that_report_nothing_fails_its_gates() -> None:
    nodes = [(facts(NodeMetrics()), NEW, T0 + S)] * 4
    result = gates.evaluate(Gates(require_healthy=False, max_error_rate=0.05), nodes, T0 + 3 * S, STALE)
    assert not result.passed and result.failing == 4
    assert "no error_rate reported" in result.summary()


def beats(n: int, digest: str, **metrics: float | None) -> list[HeartbeatRecord]:
    m = NodeMetrics(Health.HEALTHY, **metrics)
    return [HeartbeatRecord(T0 + i * S, m, digest) for i in range(n)]


def test_a_heartbeat_without_the_compared_metric_is_not_a_canary_sample() -> None:
    config = CanaryAnalysis(min_sample=3)
    # Five beats, but none carries an error rate: too few samples, so extend, not promote.
    silent = beats(5, NEW, p99_latency_ms=20.0)
    baseline = beats(5, OLD, error_rate=0.01, p99_latency_ms=20.0)
    result = canary.analyze(config, silent, baseline)
    assert result.decision is canary.Decision.EXTEND
    assert result.reason == "canary has 0 sample(s) reporting error_rate, need 3"
    assert result.canary.error_samples == 0 and result.canary.latency_samples == 5
    # Missing p99 the same way.
    result = canary.analyze(config, beats(5, NEW, error_rate=0.01), baseline)
    assert result.decision is canary.Decision.EXTEND and "reporting p99_latency_ms" in result.reason
    # Nothing at all: extend (the machine rolls back after max_extensions).
    assert canary.analyze(config, beats(9, NEW), baseline).decision is canary.Decision.EXTEND
    # With the metrics, the same canary promotes.
    full = beats(5, NEW, error_rate=0.01, p99_latency_ms=20.0)
    assert canary.analyze(config, full, baseline).decision is canary.Decision.PROMOTE


def test_absent_metrics_are_never_averaged_in_as_zeros() -> None:
    # Two bad beats with the metric and four without: the error rate is 0.3, not 0.1.
    mixed = beats(2, NEW, error_rate=0.3, p99_latency_ms=20.0) + beats(4, NEW, p99_latency_ms=20.0)
    agg = canary.aggregate(mixed)
    assert (agg.error_samples, agg.latency_samples, agg.samples) == (2, 6, 2)
    assert agg.error_rate == 0.3
    # Traffic weighting only when every sample reports traffic.
    weighted = beats(1, NEW, error_rate=0.2, requests_per_second=300.0) + beats(
        1, NEW, error_rate=0.6, requests_per_second=100.0
    )
    assert canary.aggregate(weighted).error_rate == 0.3
    partial = [*weighted, *beats(1, NEW, error_rate=0.1)]
    assert canary.aggregate(partial).error_rate == 0.3


def test_a_baseline_ratio_needs_baseline_samples_of_its_own_metric() -> None:
    config = CanaryAnalysis(min_sample=3, max_error_rate=None, max_p99_latency_ms=None)
    worse = beats(5, NEW, error_rate=0.10, p99_latency_ms=20.0)
    # The baseline reports p99 but no error rate: the error ratio is not judged on zeros.
    no_errors = beats(5, OLD, p99_latency_ms=20.0)
    result = canary.analyze(config, worse, no_errors)
    assert result.decision is canary.Decision.PROMOTE
    assert "baseline has 0 sample(s) reporting error_rate" in result.reason
    # With the baseline's error rates it is judged, and rolls back.
    result = canary.analyze(config, worse, beats(5, OLD, error_rate=0.01, p99_latency_ms=20.0))
    assert result.decision is canary.Decision.ROLLBACK and "x baseline" in result.reason
    # The p99 ratio is still judged when only the error rate is missing from the baseline.
    slow = beats(5, NEW, error_rate=0.01, p99_latency_ms=200.0)
    result = canary.analyze(config, slow, no_errors)
    assert result.decision is canary.Decision.ROLLBACK and "canary p99" in result.reason
