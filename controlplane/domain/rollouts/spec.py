"""Checking a rollout spec before anything is written; errors name the request field."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from urllib.parse import urlsplit

import promql_parser

from controlplane.domain.kernel import validation
from controlplane.domain.kernel.errors import InvalidArgument
from controlplane.domain.kernel.labels import Selector
from controlplane.domain.model.analysis import MetricAnalysis
from controlplane.domain.model.rollouts import MAX_APPROVALS, CanaryAnalysis, Gates, RolloutSpec, Strategy
from controlplane.domain.rollouts import metrics

# Bounds that catch typos (a bake of 30 h instead of 30 s) without limiting real use.
MAX_BAKE = timedelta(hours=24)
MAX_DEADLINE = timedelta(days=7)
MAX_SCHEDULE_AHEAD = timedelta(days=366)
MAX_STEPS = 20
MAX_REASON = 1000
MAX_METRICS = 10
MAX_QUERY = 4000
_NAME = re.compile(r"[A-Za-z0-9_-]{1,63}")


def validate(spec: RolloutSpec, now: datetime) -> RolloutSpec:
    """The spec with its selector in canonical form, or InvalidArgument naming the field."""
    if spec.bundle_digest:
        validation.digest(spec.bundle_digest, "bundle_digest")
    selector = Selector.parse(spec.selector, "selector").canonical()
    if spec.strategy is Strategy.ROLLING:
        _rolling(spec)
    elif spec.batch_size or spec.batch_percent:
        raise InvalidArgument("batch sizes apply to the rolling strategy only", field="rolling")
    if spec.strategy is Strategy.CANARY:
        _percent_steps(spec.canary_steps, "canary.steps_percent", last=100)
        _analysis(spec.canary)
    if spec.strategy is Strategy.BLUE_GREEN:
        _percent_steps(spec.traffic_steps, "blue_green.traffic_steps_percent", below=100)
    _count(spec.max_unavailable, "max_unavailable", 10_000)
    _count(spec.max_failures, "max_failures", 10_000)
    _count(spec.approvals_required, "approvals_required", MAX_APPROVALS)
    _gates(spec.gates)
    _duration(spec.bake_time, "bake_time", timedelta(0), MAX_BAKE)
    _duration(spec.gate_failure_window, "gate_failure_window", timedelta(0), MAX_BAKE)
    _duration(spec.progress_deadline, "progress_deadline", timedelta(seconds=1), MAX_DEADLINE)
    if spec.progress_deadline <= spec.bake_time:
        raise InvalidArgument(
            f"must be longer than the bake time ({spec.bake_time.total_seconds():g}s): the deadline "
            "covers the whole step",
            field="progress_deadline",
        )
    if spec.scheduled_at is not None:
        if spec.scheduled_at.tzinfo is None:
            raise InvalidArgument("must carry a time zone", field="scheduled_at")
        if spec.scheduled_at <= now:
            raise InvalidArgument("must be in the future; leave it unset to start now", field="scheduled_at")
        if spec.scheduled_at - now > MAX_SCHEDULE_AHEAD:
            raise InvalidArgument("must be within a year", field="scheduled_at")
    if len(set(spec.pause_after_steps)) != len(spec.pause_after_steps) or any(
        not 0 <= i < MAX_STEPS * 500 for i in spec.pause_after_steps
    ):
        raise InvalidArgument("step indexes, each once", field="pause_after_steps")
    if spec.metric_analysis is not None:
        _metric_analysis(spec.metric_analysis)
    _webhooks(spec)
    if len(spec.freeze_override_reason) > MAX_REASON:
        raise InvalidArgument(f"at most {MAX_REASON} characters", field="freeze_override_reason")
    return replace(
        spec,
        selector=selector,
        freeze_override_reason=spec.freeze_override_reason.strip(),
        pause_after_steps=tuple(sorted(spec.pause_after_steps)),
    )


def _webhooks(spec: RolloutSpec) -> None:
    phases: set[str] = set()
    for i, g in enumerate(spec.webhooks):
        if g.phase.value in phases:
            raise InvalidArgument(
                f"a second {g.phase.value} gate; one per phase", field=f"webhooks[{i}].phase"
            )
        phases.add(g.phase.value)
        if not g.channel_id:
            raise InvalidArgument("name the webhook channel to call", field=f"webhooks[{i}].channel_id")
        _duration(g.timeout, f"webhooks[{i}].timeout", timedelta(seconds=1), MAX_BAKE)
        if not 1 <= g.max_attempts <= 100:
            raise InvalidArgument(
                f"{g.max_attempts} is outside [1, 100]", field=f"webhooks[{i}].max_attempts"
            )


def _metric_analysis(a: MetricAnalysis) -> None:
    url = urlsplit(a.provider_url)
    if url.scheme not in ("http", "https") or not url.hostname or len(a.provider_url) > 2000:
        raise InvalidArgument(
            f"{a.provider_url[:100]!r} is not an http(s) URL with a host",
            field="metric_analysis.provider_url",
        )
    if not 1 <= len(a.metrics) <= MAX_METRICS:
        raise InvalidArgument(f"give 1-{MAX_METRICS} metrics", field="metric_analysis.metrics")
    names: set[str] = set()
    for i, m in enumerate(a.metrics):
        field = f"metric_analysis.metrics[{i}]"
        if not _NAME.fullmatch(m.name) or m.name in names:
            raise InvalidArgument("a unique name of 1-63 letters, digits, '_' or '-'", field=f"{field}.name")
        names.add(m.name)
        if not m.query.strip() or len(m.query) > MAX_QUERY:
            raise InvalidArgument(f"1-{MAX_QUERY} characters of PromQL", field=f"{field}.query")
        try:
            promql_parser.parse(metrics.render(m.query, ["n-a", "n-b"], ["n-c"], "r-x", 0))
        except ValueError as e:
            raise InvalidArgument(f"not valid PromQL: {str(e)[:200]}", field=f"{field}.query") from None
        success = metrics.parse_condition(m.success_condition, f"{field}.success_condition")
        failure = metrics.parse_condition(m.failure_condition, f"{field}.failure_condition")
        if success is None and failure is None:
            raise InvalidArgument("give a success or a failure condition", field=f"{field}.success_condition")
        _duration(m.interval, f"{field}.interval", timedelta(seconds=1), timedelta(hours=1))
        if not 1 <= m.count <= 100:
            raise InvalidArgument(f"{m.count} is outside [1, 100]", field=f"{field}.count")
        if not 0 <= m.failure_limit < m.count:
            raise InvalidArgument(
                "must be below count: a check whose every measurement may fail would pass on nothing",
                field=f"{field}.failure_limit",
            )
        if not 0 <= m.inconclusive_limit < m.count:
            raise InvalidArgument("must be below count", field=f"{field}.inconclusive_limit")


def _rolling(spec: RolloutSpec) -> None:
    if bool(spec.batch_size) == bool(spec.batch_percent):
        raise InvalidArgument("give exactly one of batch_size and batch_percent", field="rolling")
    _count(spec.batch_size, "rolling.batch_size", 10_000)
    if not 0 <= spec.batch_percent <= 100:
        raise InvalidArgument(f"{spec.batch_percent} is outside [1, 100]", field="rolling.batch_percent")


def _percent_steps(steps: Sequence[int], field: str, last: int | None = None, below: int = 101) -> None:
    if not steps:
        raise InvalidArgument("must list at least one step", field=field)
    if len(steps) > MAX_STEPS:
        raise InvalidArgument(f"at most {MAX_STEPS} steps", field=field)
    previous = 0
    for value in steps:
        if not previous < value < below or value > 100:
            raise InvalidArgument(
                f"{list(steps)} must be strictly increasing percentages in [1, {min(below - 1, 100)}]",
                field=field,
            )
        previous = value
    if last is not None and steps[-1] != last:
        raise InvalidArgument(f"the last step must be {last}", field=field)


def _analysis(a: CanaryAnalysis) -> None:
    _threshold(a.max_error_rate, 0.0, 1.0, "canary.analysis.max_error_rate")
    _threshold(a.max_p99_latency_ms, 0.0, 3.6e6, "canary.analysis.max_p99_latency_ms")
    validation.bounded(a.max_error_ratio, 1.0, 1000.0, "canary.analysis.max_error_ratio")
    validation.bounded(a.max_latency_ratio, 1.0, 1000.0, "canary.analysis.max_latency_ratio")
    if not 1 <= a.min_sample <= 10_000:
        raise InvalidArgument(f"{a.min_sample} is outside [1, 10000]", field="canary.analysis.min_sample")
    _count(a.max_extensions, "canary.analysis.max_extensions", 100)


def _gates(g: Gates) -> None:
    _threshold(g.max_error_rate, 0.0, 1.0, "gates.max_error_rate")
    _threshold(g.max_p99_latency_ms, 0.0, 3.6e6, "gates.max_p99_latency_ms")
    _threshold(g.max_cpu_percent, 0.0, 100.0, "gates.max_cpu_percent")
    _threshold(g.max_memory_percent, 0.0, 100.0, "gates.max_memory_percent")


def _threshold(value: float | None, low: float, high: float, field: str) -> None:
    if value is not None:
        validation.bounded(value, low, high, field)


def _count(value: int, field: str, high: int) -> None:
    if not 0 <= value <= high:
        raise InvalidArgument(f"{value} is outside [0, {high}]", field=field)


def _duration(value: timedelta, field: str, low: timedelta, high: timedelta) -> None:
    seconds = value.total_seconds()
    if not math.isfinite(seconds) or not low <= value <= high:
        raise InvalidArgument(
            f"{seconds:g}s is outside [{low.total_seconds():g}s, {high.total_seconds():g}s]", field=field
        )
