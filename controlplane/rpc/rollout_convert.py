"""Rollout records to messages and back. No logic beyond the mapping (and the defaults
a message leaves to the server)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from controlplane.api.rollout.v1 import drift_pb2 as dpb
from controlplane.api.rollout.v1 import rollout_pb2 as pb
from controlplane.domain.kernel.errors import InvalidArgument
from controlplane.domain.model.analysis import MetricAnalysis, MetricCheck
from controlplane.domain.model.drift import DriftEpisode
from controlplane.domain.model.rollouts import (
    CanaryAnalysis,
    FreezeWindow,
    Gates,
    NodeState,
    Rollout,
    RolloutEvent,
    RolloutNode,
    RolloutSpec,
    RolloutState,
    RolloutView,
    Step,
    StepKind,
    StepState,
    Strategy,
)
from controlplane.domain.model.webhooks import OnFailure, WebhookGate, WebhookPhase
from controlplane.rpc.convert import duration_in, timestamp

STRATEGY = {
    Strategy.ALL_AT_ONCE: pb.STRATEGY_ALL_AT_ONCE,
    Strategy.ROLLING: pb.STRATEGY_ROLLING,
    Strategy.CANARY: pb.STRATEGY_CANARY,
    Strategy.BLUE_GREEN: pb.STRATEGY_BLUE_GREEN,
}
STRATEGY_IN = {v: k for k, v in STRATEGY.items()}
STATE = {s: pb.RolloutState.Value(f"ROLLOUT_STATE_{s.name}") for s in RolloutState}
STATE_IN = {v: k for k, v in STATE.items()}
STEP_STATE = {s: pb.StepState.Value(f"STEP_STATE_{s.name}") for s in StepState}
STEP_KIND = {k: pb.StepKind.Value(f"STEP_KIND_{k.name}") for k in StepKind}
NODE_STATE = {s: pb.NodeState.Value(f"NODE_STATE_{s.name}") for s in NodeState}


def time_in(ts: Timestamp, field: str) -> datetime:
    """A request's Timestamp as an aware datetime; nonsense (year 0, 10^19 s) names the field."""
    try:
        return ts.ToDatetime(tzinfo=UTC)
    except (OverflowError, ValueError, OSError):
        raise InvalidArgument("is not a valid time", field=field) from None


def _duration(value: timedelta) -> Duration:
    d = Duration()
    d.FromTimedelta(value)
    return d


def _opt(message: Any, name: str) -> Any:
    return getattr(message, name) if message.HasField(name) else None


def spec_in(r: pb.CreateRolloutRequest) -> RolloutSpec:
    strategy = STRATEGY_IN.get(r.strategy)
    if strategy is None:
        raise InvalidArgument("choose ALL_AT_ONCE, ROLLING, CANARY or BLUE_GREEN", field="strategy")
    params = r.WhichOneof("params")
    expected = {Strategy.ROLLING: "rolling", Strategy.CANARY: "canary", Strategy.BLUE_GREEN: "blue_green"}
    if params is not None and params != expected.get(strategy):
        raise InvalidArgument(
            f"{params} parameters do not go with the {strategy.value} strategy", field=params
        )
    values: dict[str, Any] = {}
    if r.HasField("rolling"):
        values |= {"batch_size": r.rolling.batch_size, "batch_percent": r.rolling.batch_percent}
    if r.HasField("canary"):
        if r.canary.steps_percent:
            values["canary_steps"] = tuple(r.canary.steps_percent)
        a, d = r.canary.analysis, CanaryAnalysis()
        values["canary"] = CanaryAnalysis(
            max_error_rate=a.max_error_rate if a.HasField("max_error_rate") else d.max_error_rate,
            max_p99_latency_ms=a.max_p99_latency_ms
            if a.HasField("max_p99_latency_ms")
            else d.max_p99_latency_ms,
            max_error_ratio=a.max_error_ratio if a.HasField("max_error_ratio") else d.max_error_ratio,
            max_latency_ratio=a.max_latency_ratio if a.HasField("max_latency_ratio") else d.max_latency_ratio,
            min_sample=a.min_sample if a.HasField("min_sample") else d.min_sample,
            max_extensions=a.max_extensions if a.HasField("max_extensions") else d.max_extensions,
        )
    if r.HasField("blue_green") and r.blue_green.traffic_steps_percent:
        values["traffic_steps"] = tuple(r.blue_green.traffic_steps_percent)
    if r.HasField("gates"):
        g = r.gates
        values["gates"] = Gates(
            require_healthy=g.require_healthy,
            max_error_rate=_opt(g, "max_error_rate"),
            max_p99_latency_ms=_opt(g, "max_p99_latency_ms"),
            max_cpu_percent=_opt(g, "max_cpu_percent"),
            max_memory_percent=_opt(g, "max_memory_percent"),
        )
    for name in ("bake_time", "progress_deadline", "gate_failure_window"):
        if r.HasField(name):
            values[name] = duration_in(getattr(r, name), name)
    if r.HasField("scheduled_at"):
        values["scheduled_at"] = time_in(r.scheduled_at, "scheduled_at")
    if r.HasField("metric_analysis"):
        values["metric_analysis"] = _analysis_in(r.metric_analysis)
    if r.webhooks:
        values["webhooks"] = tuple(_gate_in(i, g) for i, g in enumerate(r.webhooks))
    return RolloutSpec(
        bundle_digest=r.bundle_digest,
        selector=r.selector,
        strategy=strategy,
        max_unavailable=r.max_unavailable,
        auto_rollback=r.auto_rollback if r.HasField("auto_rollback") else True,
        max_failures=r.max_failures,
        approvals_required=r.approvals_required,
        freeze_override_reason=r.freeze_override_reason,
        pause_after_steps=tuple(r.pause_after_steps),
        **values,
    )


def _analysis_in(a: pb.MetricAnalysis) -> MetricAnalysis:
    checks = []
    for i, m in enumerate(a.metrics):
        d = MetricCheck("", "")
        checks.append(
            MetricCheck(
                name=m.name,
                query=m.query,
                success_condition=m.success_condition,
                failure_condition=m.failure_condition,
                interval=duration_in(m.interval, f"metric_analysis.metrics[{i}].interval")
                if m.HasField("interval")
                else d.interval,
                count=m.count or d.count,
                failure_limit=m.failure_limit,
                inconclusive_limit=m.inconclusive_limit,
            )
        )
    return MetricAnalysis(a.provider_url, tuple(checks), a.dry_run)


_PHASE = {
    WebhookPhase.PRE_ROLLOUT: pb.WEBHOOK_PHASE_PRE_ROLLOUT,
    WebhookPhase.PRE_PROMOTION: pb.WEBHOOK_PHASE_PRE_PROMOTION,
    WebhookPhase.POST_STEP: pb.WEBHOOK_PHASE_POST_STEP,
    WebhookPhase.POST_ROLLOUT: pb.WEBHOOK_PHASE_POST_ROLLOUT,
}
_PHASE_IN = {v: k for k, v in _PHASE.items()}


def _gate_in(i: int, g: pb.WebhookGate) -> WebhookGate:
    if g.phase not in _PHASE_IN:
        raise InvalidArgument("give the gate's phase", field=f"webhooks[{i}].phase")
    d = WebhookGate(WebhookPhase.PRE_PROMOTION, "")
    return WebhookGate(
        phase=_PHASE_IN[g.phase],
        channel_id=g.channel_id,
        timeout=duration_in(g.timeout, f"webhooks[{i}].timeout") if g.HasField("timeout") else d.timeout,
        max_attempts=g.max_attempts or d.max_attempts,
        on_failure=OnFailure.ROLLBACK if g.on_failure == pb.WEBHOOK_FAILURE_ROLLBACK else OnFailure.PAUSE,
    )


def _gate_out(g: WebhookGate) -> pb.WebhookGate:
    return pb.WebhookGate(
        phase=_PHASE[g.phase],
        channel_id=g.channel_id,
        timeout=_duration(g.timeout),
        max_attempts=g.max_attempts,
        on_failure=pb.WEBHOOK_FAILURE_ROLLBACK
        if g.on_failure is OnFailure.ROLLBACK
        else pb.WEBHOOK_FAILURE_PAUSE,
    )


def _analysis_out(a: MetricAnalysis) -> pb.MetricAnalysis:
    return pb.MetricAnalysis(
        provider_url=a.provider_url,
        dry_run=a.dry_run,
        metrics=[
            pb.MetricCheck(
                name=m.name,
                query=m.query,
                success_condition=m.success_condition,
                failure_condition=m.failure_condition,
                interval=_duration(m.interval),
                count=m.count,
                failure_limit=m.failure_limit,
                inconclusive_limit=m.inconclusive_limit,
            )
            for m in a.metrics
        ],
    )


def _measurement_out(m: Mapping[str, Any]) -> pb.Measurement:
    at = timestamp(datetime.fromisoformat(m["at"]))
    out = pb.Measurement(metric=m["metric"], phase=m["phase"], reason=m["reason"], at=at)
    if m.get("value") is not None:
        out.value = m["value"]
    return out


def spec_out(project: str, s: RolloutSpec) -> pb.CreateRolloutRequest:
    msg = pb.CreateRolloutRequest(
        project=project,
        bundle_digest=s.bundle_digest,
        selector=s.selector,
        strategy=STRATEGY[s.strategy],
        max_unavailable=s.max_unavailable,
        bake_time=_duration(s.bake_time),
        progress_deadline=_duration(s.progress_deadline),
        gate_failure_window=_duration(s.gate_failure_window),
        auto_rollback=s.auto_rollback,
        max_failures=s.max_failures,
        approvals_required=s.approvals_required,
        scheduled_at=timestamp(s.scheduled_at),
        freeze_override_reason=s.freeze_override_reason,
        pause_after_steps=list(s.pause_after_steps),
        gates=pb.HealthGates(
            require_healthy=s.gates.require_healthy,
            **{k: v for k, v in s.gates.to_json().items() if k != "require_healthy" and v is not None},
        ),
    )
    if s.metric_analysis is not None:
        msg.metric_analysis.CopyFrom(_analysis_out(s.metric_analysis))
    msg.webhooks.extend(_gate_out(g) for g in s.webhooks)
    if s.strategy is Strategy.ROLLING:
        msg.rolling.CopyFrom(pb.RollingParams(batch_size=s.batch_size, batch_percent=s.batch_percent))
    elif s.strategy is Strategy.CANARY:
        analysis = {k: v for k, v in s.canary.to_json().items() if v is not None}
        msg.canary.CopyFrom(
            pb.CanaryParams(steps_percent=list(s.canary_steps), analysis=pb.CanaryAnalysis(**analysis))
        )
    elif s.strategy is Strategy.BLUE_GREEN:
        msg.blue_green.CopyFrom(pb.BlueGreenParams(traffic_steps_percent=list(s.traffic_steps)))
    return msg


def progress_out(rollout: Rollout) -> pb.Progress:
    p: Mapping[str, Any] = rollout.progress
    step: Mapping[str, Any] = p.get("step", {})
    return pb.Progress(
        total=p.get("total", 0),
        nodes=p.get("nodes", {}),
        steps=p.get("steps", 0),
        steps_done=p.get("steps_done", 0),
        current_step=rollout.current_step,
        current_step_state=STEP_STATE[StepState(step["state"])] if step else pb.STEP_STATE_UNSPECIFIED,
        gates=step.get("gates", "") if step else "",
        traffic=p.get("traffic", ""),
    )


def step_out(s: Step) -> pb.Step:
    analyses = [
        pb.CanaryResult(
            decision=a["decision"],
            reason=a["reason"],
            canary_samples=a["canary"]["samples"],
            canary_error_rate=a["canary"]["error_rate"],
            canary_p99_latency_ms=a["canary"]["p99_latency_ms"],
            baseline_samples=a["baseline"]["samples"],
            baseline_error_rate=a["baseline"]["error_rate"],
            baseline_p99_latency_ms=a["baseline"]["p99_latency_ms"],
        )
        for a in s.detail.get("analyses", [])
    ]
    return pb.Step(
        index=s.index,
        kind=STEP_KIND[s.kind],
        state=STEP_STATE[s.state],
        traffic_weight=s.traffic_weight,
        node_count=s.node_count,
        revision=s.revision,
        started_at=timestamp(s.started_at),
        applied_at=timestamp(s.applied_at),
        finished_at=timestamp(s.finished_at),
        gate_failing_since=timestamp(s.gate_failing_since),
        gates=s.detail.get("gates", ""),
        extensions=s.extensions,
        analyses=analyses,
        failure=s.detail.get("failure", ""),
        measurements=[
            _measurement_out(m) for m in [*s.detail.get("superseded", []), *s.detail.get("measurements", [])]
        ],
        routers=[
            pb.StepRouter(node_id=node_id, revision=e["revision"], state=e["state"], error=e.get("error", ""))
            for node_id, e in sorted((s.detail.get("routers") or {}).items())
        ],
    )


def rollout_out(r: Rollout, view: RolloutView | None = None) -> pb.Rollout:
    msg = pb.Rollout(
        id=r.id,
        project=r.project,
        bundle_digest=r.spec.bundle_digest,
        selector=r.spec.selector,
        strategy=STRATEGY[r.spec.strategy],
        state=STATE[r.state],
        reason=r.reason,
        created_by=r.created_by,
        created_at=timestamp(r.created_at),
        scheduled_at=timestamp(r.spec.scheduled_at),
        started_at=timestamp(r.started_at),
        finished_at=timestamp(r.finished_at),
        progress=progress_out(r),
        approvals_required=r.spec.approvals_required,
        event_seq=r.event_seq,
        spec=spec_out(r.project, r.spec),
        retry_of=r.spec.retry_of,
    )
    if view is not None:
        msg.steps.extend(step_out(s) for s in view.steps)
        msg.approvals.extend(
            pb.Approval(actor=a.actor, at=timestamp(a.at), comment=a.comment) for a in view.approvals
        )
    return msg


def view_out(view: RolloutView) -> pb.Rollout:
    return rollout_out(view.rollout, view)


def node_out(n: RolloutNode) -> pb.RolloutNode:
    return pb.RolloutNode(
        node_id=n.node_id,
        step=max(n.step, 0),
        state=NODE_STATE[n.state],
        previous_digest=n.previous_digest,
        assigned_revision=n.assigned_revision,
        error=n.error,
        updated_at=timestamp(n.updated_at),
        role=n.role.value,
    )


def event_out(e: RolloutEvent) -> pb.RolloutEvent:
    msg = pb.RolloutEvent(
        seq=e.seq,
        at=timestamp(e.at),
        kind=e.kind,
        state=STATE[e.state],
        message=e.message,
        node_id=e.node_id or "",
    )
    if e.step is not None:
        msg.step = e.step
    return msg


def freeze_out(w: FreezeWindow) -> pb.FreezeWindow:
    return pb.FreezeWindow(
        id=w.id,
        project=w.project,
        name=w.name,
        starts_at=timestamp(w.starts_at),
        ends_at=timestamp(w.ends_at),
        reason=w.reason,
        created_by=w.created_by,
        created_at=timestamp(w.created_at),
    )


def drift_out(e: DriftEpisode) -> dpb.DriftEvent:
    return dpb.DriftEvent(
        id=e.id,
        project=e.project,
        node_id=e.node_id,
        desired_digest=e.desired_digest,
        applied_digest=e.applied_digest,
        detected_at=timestamp(e.detected_at),
        resolved_at=timestamp(e.resolved_at),
        resolution=e.resolution,
        remediations=e.remediations,
        last_remediated_at=timestamp(e.last_remediated_at),
    )
