"""`controlplane rollout ...` and `controlplane drift ...`."""

from __future__ import annotations

import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
import grpc
from google.protobuf import json_format
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from controlplane.api.rollout.v1 import drift_pb2, drift_pb2_grpc, rollout_pb2, rollout_pb2_grpc
from controlplane.cli import output
from controlplane.cli.client import call, call_pages, channel, print_message, project_option, server_option
from controlplane.cli.output import OutputGroup, paged
from controlplane.cli.servers import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_ROLLED_BACK,
    EXIT_SUCCEEDED,
    Reconnect,
    ServerChannel,
    parse_deadline,
    reconnect_option,
)

pb = rollout_pb2
STRATEGIES = {
    "all-at-once": pb.STRATEGY_ALL_AT_ONCE,
    "rolling": pb.STRATEGY_ROLLING,
    "canary": pb.STRATEGY_CANARY,
    "blue-green": pb.STRATEGY_BLUE_GREEN,
}
STATES = {
    pb.RolloutState.Name(v).removeprefix("ROLLOUT_STATE_").lower(): v for v in pb.RolloutState.values() if v
}
TERMINAL = {
    pb.ROLLOUT_STATE_SUCCEEDED,
    pb.ROLLOUT_STATE_CANCELLED,
    pb.ROLLOUT_STATE_ROLLED_BACK,
    pb.ROLLOUT_STATE_REJECTED,
}
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)?$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
_GATE = re.compile(r"^(error_rate|p99|p99_latency_ms|cpu|memory)\s*<\s*([0-9.]+)$")


def parse_duration(text: str) -> timedelta:
    """`30s`, `10m`, `1.5h`, `500ms`, or plain seconds."""
    match = _DURATION.match(text.strip())
    if match is None:
        raise click.BadParameter(f"{text!r} is not a duration such as 30s, 10m or 1h")
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


def _duration(text: str) -> Duration:
    d = Duration()
    d.FromTimedelta(parse_duration(text))
    return d


def parse_time(text: str) -> datetime:
    """An ISO-8601 time (UTC if no zone), `now`, or `+10m` from now."""
    text = text.strip()
    if text == "now":
        return datetime.now(UTC)
    if text.startswith("+"):
        return datetime.now(UTC) + parse_duration(text[1:])
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not an ISO-8601 time, 'now' or '+<duration>'") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _timestamp(value: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def _percents(text: str) -> list[int]:
    try:
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a list of percentages such as 5,25,50,100") from None


def _gates(items: tuple[str, ...], none: bool) -> pb.HealthGates | None:
    if none:
        return pb.HealthGates()
    if not items:
        return None  # the server's default: a healthy heartbeat
    gates = pb.HealthGates()
    for item in items:
        if item == "healthy":
            gates.require_healthy = True
            continue
        match = _GATE.match(item.replace(" ", ""))
        if match is None:
            raise click.BadParameter(f"{item!r}: use healthy, error_rate<X, p99<MS, cpu<PCT or memory<PCT")
        name = {"p99": "max_p99_latency_ms", "p99_latency_ms": "max_p99_latency_ms"}.get(
            match.group(1),
            f"max_{match.group(1)}" + ("_percent" if match.group(1) in ("cpu", "memory") else ""),
        )
        setattr(gates, name, float(match.group(2)))
    return gates


def _stub(server: str) -> rollout_pb2_grpc.RolloutServiceStub:
    return rollout_pb2_grpc.RolloutServiceStub(channel(server))


@click.group(cls=OutputGroup)
def rollout() -> None:
    """Rollouts: move a selector's nodes to a bundle, safely."""


@rollout.command("create")
@server_option
@project_option
@click.argument("bundle")
@click.option("--selector", required=True, help="env=prod,region=eu or '*'")
@click.option("--strategy", type=click.Choice(list(STRATEGIES)), default="rolling", show_default=True)
@click.option("--batch-size", type=click.IntRange(1), help="Rolling: nodes per step.")
@click.option("--batch-percent", type=click.IntRange(1, 100), help="Rolling: percent of the nodes per step.")
@click.option("--canary-steps", default="", help="Canary: cumulative percentages, e.g. 5,25,50,100.")
@click.option("--canary-min-sample", type=click.IntRange(1), help="Canary: heartbeat samples needed.")
@click.option(
    "--traffic-steps", default="", help="Blue-green: weights of the new set before the swap, e.g. 10,50."
)
@click.option("--max-unavailable", type=click.IntRange(0), default=0, show_default=True)
@click.option(
    "--gate", "gates", multiple=True, help="healthy, error_rate<0.05, p99<500, cpu<80, memory<90 (repeat)."
)
@click.option("--no-gates", is_flag=True, help="No health gates at all.")
@click.option("--bake", default="30s", show_default=True, help="How long gates must hold per step.")
@click.option("--deadline", default="10m", show_default=True, help="Longest a step may take.")
@click.option(
    "--gate-window", default="60s", show_default=True, help="How long gates may fail before rollback."
)
@click.option("--auto-rollback/--no-auto-rollback", default=True, show_default=True)
@click.option("--max-failures", type=click.IntRange(0), default=0, show_default=True, help="NACKs tolerated.")
@click.option(
    "--approvals", type=click.IntRange(0), default=0, show_default=True, help="Distinct approvers needed."
)
@click.option("--at", "start_at", default=None, help="Start time: ISO-8601 or +10m.")
@click.option(
    "--override-freeze", default="", help="Start and advance through freeze windows, for this reason."
)
@click.option("--pause-after", default="", help="Pause steps: wait for an operator after steps, e.g. 0,2.")
@click.option(
    "--analysis",
    "analysis_file",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Metric analysis: a JSON file of MetricAnalysis (provider_url, metrics, dry_run).",
)
@click.option(
    "--webhook",
    "webhooks",
    multiple=True,
    help="A webhook gate: PHASE=CHANNEL_ID[:rollback] with PHASE pre-rollout, pre-promotion, post-step "
    "or post-rollout (repeat).",
)
@click.option(
    "--watch",
    "follow",
    is_flag=True,
    help="Follow the rollout until it ends; the exit code says how (0 succeeded, 3 failed, "
    "4 rolled back, 5 server unreachable).",
)
@reconnect_option
def rollout_create(
    server: str,
    project: str,
    bundle: str,
    selector: str,
    strategy: str,
    batch_size: int | None,
    batch_percent: int | None,
    canary_steps: str,
    canary_min_sample: int | None,
    traffic_steps: str,
    max_unavailable: int,
    gates: tuple[str, ...],
    no_gates: bool,
    bake: str,
    deadline: str,
    gate_window: str,
    auto_rollback: bool,
    max_failures: int,
    approvals: int,
    start_at: str | None,
    override_freeze: str,
    pause_after: str,
    analysis_file: str | None,
    webhooks: tuple[str, ...],
    follow: bool,
    reconnect_deadline: str,
) -> None:
    """Create a rollout of BUNDLE (a digest or a version label)."""
    request = pb.CreateRolloutRequest(
        project=project,
        selector=selector,
        strategy=STRATEGIES[strategy],
        max_unavailable=max_unavailable,
        bake_time=_duration(bake),
        progress_deadline=_duration(deadline),
        gate_failure_window=_duration(gate_window),
        auto_rollback=auto_rollback,
        max_failures=max_failures,
        approvals_required=approvals,
        freeze_override_reason=override_freeze,
        pause_after_steps=_indexes(pause_after),
    )
    if analysis_file:
        try:
            json_format.Parse(Path(analysis_file).read_text(), request.metric_analysis)
        except (json_format.ParseError, OSError, UnicodeDecodeError) as e:
            raise click.BadParameter(str(e)[:300], param_hint="--analysis") from None
    request.webhooks.extend(_webhook(text) for text in webhooks)
    if bundle.startswith("sha256:"):
        request.bundle_digest = bundle
    else:
        request.bundle_version = bundle
    if strategy == "rolling":
        if batch_size is None and batch_percent is None:
            batch_percent = 10
        request.rolling.CopyFrom(
            pb.RollingParams(batch_size=batch_size or 0, batch_percent=batch_percent or 0)
        )
    elif strategy == "canary":
        analysis = pb.CanaryAnalysis()
        if canary_min_sample:
            analysis.min_sample = canary_min_sample
        request.canary.CopyFrom(pb.CanaryParams(steps_percent=_percents(canary_steps), analysis=analysis))
    elif strategy == "blue-green":
        request.blue_green.CopyFrom(pb.BlueGreenParams(traffic_steps_percent=_percents(traffic_steps)))
    gate_message = _gates(gates, no_gates)
    if gate_message is not None:
        request.gates.CopyFrom(gate_message)
    if start_at:
        request.scheduled_at.CopyFrom(_timestamp(parse_time(start_at)))
    servers = channel(server)
    try:
        reply = rollout_pb2_grpc.RolloutServiceStub(servers).CreateRollout(request)
    except grpc.RpcError as e:
        raise output.fail(e) from None
    created = reply.rollout
    if output.current_format() == "table":
        click.echo(f"rollout {created.id}: {_state(created.state)}, {len(created.steps)} step(s)")
    else:
        print_message(reply)
    if follow:
        sys.exit(_follow(servers, project, created.id, parse_deadline(reconnect_deadline)))


@rollout.command("get")
@server_option
@project_option
@click.argument("rollout_id")
def rollout_get(server: str, project: str, rollout_id: str) -> None:
    """Show a rollout with its steps."""
    stub = _stub(server)
    call(lambda: stub.GetRollout(pb.GetRolloutRequest(project=project, rollout_id=rollout_id)))


@rollout.command("list")
@server_option
@project_option
@click.option("--state", "states", multiple=True, type=click.Choice(list(STATES)))
@paged
def rollout_list(server: str, project: str, states: tuple[str, ...], limit: int, all_pages: bool) -> None:
    """List rollouts, newest first."""
    stub = _stub(server)

    def page(token: str, size: int) -> Any:
        request = pb.ListRolloutsRequest(
            project=project, states=[STATES[s] for s in states], page_size=size, page_token=token
        )
        return stub.ListRollouts(request)

    call_pages(page, "rollouts", limit, all_pages, "rollouts")


@rollout.command("nodes")
@server_option
@project_option
@click.argument("rollout_id")
@paged
def rollout_nodes(server: str, project: str, rollout_id: str, limit: int, all_pages: bool) -> None:
    """The rollout's nodes and where each stands."""
    stub = _stub(server)

    def page(token: str, size: int) -> Any:
        request = pb.ListRolloutNodesRequest(
            project=project, rollout_id=rollout_id, page_size=size, page_token=token
        )
        return stub.ListRolloutNodes(request)

    call_pages(page, "nodes", limit, all_pages, "nodes")


@rollout.command("watch")
@server_option
@project_option
@reconnect_option
@click.argument("rollout_id")
def rollout_watch(server: str, project: str, reconnect_deadline: str, rollout_id: str) -> None:
    """Follow a rollout live (steps, nodes converged, gates) until it ends, across server
    restarts and failovers. Exits 0 if it succeeded, 3 if it failed (or was cancelled or
    rejected), 4 if it was rolled back, 5 if no server could be reached for
    --reconnect-deadline."""
    sys.exit(_follow(channel(server), project, rollout_id, parse_deadline(reconnect_deadline)))


def _simple(name: str, request_type: Any, method: str, helptext: str, **extra: Any) -> None:
    @rollout.command(name, help=helptext)
    @server_option
    @project_option
    @click.argument("rollout_id")
    @click.option("--reason", default="", help="Why (kept in the rollout and the audit log).")
    def command(server: str, project: str, rollout_id: str, reason: str) -> None:
        stub = _stub(server)
        fields: dict[str, Any] = {"project": project, "rollout_id": rollout_id}
        if "reason" in request_type.DESCRIPTOR.fields_by_name:
            fields["reason"] = reason
        elif "comment" in request_type.DESCRIPTOR.fields_by_name:
            fields["comment"] = reason
        try:
            reply = getattr(stub, method)(request_type(**fields))
        except grpc.RpcError as e:
            raise output.fail(e) from None
        if output.current_format() != "table":
            print_message(reply)
            return
        result = reply.rollout
        click.echo(
            f"rollout {result.id}: {_state(result.state)}" + (f" ({result.reason})" if result.reason else "")
        )


_simple("pause", pb.PauseRolloutRequest, "PauseRollout", "Pause a running rollout.")
_simple("resume", pb.ResumeRolloutRequest, "ResumeRollout", "Resume a paused rollout.")
_simple(
    "cancel",
    pb.CancelRolloutRequest,
    "CancelRollout",
    "Cancel a rollout: nodes on its bundle keep it, every other node it wrote goes back.",
)
_simple("rollback", pb.RollbackRolloutRequest, "RollbackRollout", "Put every node back on what it had.")
_simple("approve", pb.ApproveRolloutRequest, "ApproveRollout", "Approve (the creator cannot).")
_simple("reject", pb.RejectRolloutRequest, "RejectRollout", "Reject a rollout awaiting approval.")
_simple(
    "promote",
    pb.PromoteRolloutRequest,
    "PromoteRollout",
    "Take a running or paused rollout to the end now: no more bake, gates, analysis or pause steps.",
)
_simple("skip-step", pb.SkipRolloutStepRequest, "SkipRolloutStep", "End the current step now.")
_simple(
    "retry",
    pb.RetryRolloutRequest,
    "RetryRollout",
    "Retry a rolled-back or cancelled rollout as a new one (prints the new rollout).",
)


@rollout.group("freeze")
def freeze() -> None:
    """Freeze windows: no rollout starts or advances during one."""


@freeze.command("create")
@server_option
@project_option
@click.argument("name")
@click.option("--from", "starts", default="now", show_default=True, help="ISO-8601, now, or +1h.")
@click.option("--until", "ends", required=True, help="ISO-8601 or +2h.")
@click.option("--reason", required=True)
def freeze_create(server: str, project: str, name: str, starts: str, ends: str, reason: str) -> None:
    stub = _stub(server)
    request = pb.CreateFreezeWindowRequest(
        project=project,
        name=name,
        starts_at=_timestamp(parse_time(starts)),
        ends_at=_timestamp(parse_time(ends)),
        reason=reason,
    )
    call(lambda: stub.CreateFreezeWindow(request))


@freeze.command("list")
@server_option
@project_option
@click.option("--all", "include_past", is_flag=True, help="Also windows that have ended.")
def freeze_list(server: str, project: str, include_past: bool) -> None:
    stub = _stub(server)
    call(
        lambda: stub.ListFreezeWindows(
            pb.ListFreezeWindowsRequest(project=project, include_past=include_past)
        )
    )


@freeze.command("delete")
@server_option
@project_option
@click.argument("window_id")
def freeze_delete(server: str, project: str, window_id: str) -> None:
    stub = _stub(server)
    call(lambda: stub.DeleteFreezeWindow(pb.DeleteFreezeWindowRequest(project=project, id=window_id)))


@rollout.command("pin")
@server_option
@project_option
@click.argument("node_id")
@click.argument("bundle")
@click.option("--reason", required=True)
@click.option(
    "--break-glass",
    default="",
    help="Admins: pin to a bundle the node does not run in a project that requires approvals.",
)
def rollout_pin(server: str, project: str, node_id: str, bundle: str, reason: str, break_glass: str) -> None:
    """Hold NODE_ID on BUNDLE (digest or version): rollouts skip it."""
    stub = _stub(server)
    request = pb.PinNodeRequest(
        project=project, node_id=node_id, reason=reason, break_glass_reason=break_glass
    )
    if bundle.startswith("sha256:"):
        request.digest = bundle
    else:
        request.bundle_version = bundle
    call(lambda: stub.PinNode(request))


@rollout.command("unpin")
@server_option
@project_option
@click.argument("node_id")
def rollout_unpin(server: str, project: str, node_id: str) -> None:
    stub = _stub(server)
    call(lambda: stub.UnpinNode(pb.UnpinNodeRequest(project=project, node_id=node_id)))


# -- watching ---------------------------------------------------------------------------


_PHASES = {
    "pre-rollout": pb.WEBHOOK_PHASE_PRE_ROLLOUT,
    "pre-promotion": pb.WEBHOOK_PHASE_PRE_PROMOTION,
    "post-step": pb.WEBHOOK_PHASE_POST_STEP,
    "post-rollout": pb.WEBHOOK_PHASE_POST_ROLLOUT,
}


def _webhook(text: str) -> pb.WebhookGate:
    phase, _, target = text.partition("=")
    channel_id, _, failure = target.partition(":")
    if phase not in _PHASES or not channel_id or failure not in ("", "rollback", "pause"):
        raise click.BadParameter(
            f"{text!r}: PHASE=CHANNEL_ID[:rollback], PHASE one of {', '.join(_PHASES)}",
            param_hint="--webhook",
        )
    on_failure = pb.WEBHOOK_FAILURE_ROLLBACK if failure == "rollback" else pb.WEBHOOK_FAILURE_PAUSE
    return pb.WebhookGate(phase=_PHASES[phase], channel_id=channel_id, on_failure=on_failure)


def _indexes(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r}: step indexes like 0,2", param_hint="--pause-after") from None


def _state(value: int) -> str:
    return pb.RolloutState.Name(value).removeprefix("ROLLOUT_STATE_").lower()  # type: ignore[arg-type]


def _progress(p: pb.Progress, state: int) -> str:
    step_state = pb.StepState.Name(p.current_step_state).removeprefix("STEP_STATE_").lower()
    nodes = " ".join(f"{k} {v}" for k, v in sorted(p.nodes.items()))
    where = (
        f"step {p.current_step + 1}/{p.steps} {step_state}" if p.current_step >= 0 else f"0/{p.steps} steps"
    )
    gates = f" | gates: {p.gates}" if p.gates else ""
    return f"[{_state(state)}] {where} | {p.steps_done} done | {nodes or 'no nodes'}{gates}"


TERMINAL_EXIT: dict[int, int] = {
    pb.ROLLOUT_STATE_SUCCEEDED: EXIT_SUCCEEDED,
    pb.ROLLOUT_STATE_ROLLED_BACK: EXIT_ROLLED_BACK,
    pb.ROLLOUT_STATE_FAILED: EXIT_FAILED,
    pb.ROLLOUT_STATE_CANCELLED: EXIT_FAILED,
    pb.ROLLOUT_STATE_REJECTED: EXIT_FAILED,
}


def _event_line(e: pb.RolloutEvent) -> str:
    at = e.at.ToDatetime(tzinfo=UTC).strftime("%H:%M:%S")
    return f"  {at} {e.kind:9} {e.message}"


class _Follower:
    """Prints one rollout's progress across as many WatchRollout streams as it takes:
    first its history, then, after a reconnect, the events it missed (ListRolloutEvents
    after the last one printed); nothing twice."""

    def __init__(self, stub: rollout_pb2_grpc.RolloutServiceStub, project: str, rollout_id: str):
        self.stub = stub
        self.project = project
        self.rollout_id = rollout_id
        self.last_seq: int | None = None
        self.state: int = pb.ROLLOUT_STATE_UNSPECIFIED

    def stream(self, reconnect: Reconnect) -> None:
        """One stream, to its end (the rollout's end, or the stream's)."""
        request = pb.WatchRolloutRequest(project=self.project, rollout_id=self.rollout_id)
        call = self.stub.WatchRollout(request)
        for message in call:
            reconnect.progressed()
            if message.HasField("snapshot"):
                self._snapshot(message.snapshot)
            for e in message.events:
                if e.seq > (self.last_seq or 0):
                    click.echo(_event_line(e))
                    self.last_seq = e.seq
            click.echo(_progress(message.progress, message.state))
            self.state = message.state
            if self.ended:
                # FAILED holds its nodes (the server's stream goes on), but the outcome
                # is known.
                call.cancel()
                return

    def _snapshot(self, r: pb.Rollout) -> None:
        if self.last_seq is None:
            # The story so far first: a watch started late (or after the end) still
            # shows every event, once.
            click.echo(f"rollout {r.id}: {r.selector} -> {r.bundle_digest} ({len(r.steps)} step(s))")
            self.last_seq = 0
        # What happened before this stream, from the history.
        while self.last_seq < r.event_seq:
            page = self.stub.ListRolloutEvents(
                pb.ListRolloutEventsRequest(
                    project=self.project, rollout_id=self.rollout_id, after_seq=self.last_seq, page_size=500
                )
            ).events
            if not page:
                break
            for e in page:
                click.echo(_event_line(e))
                self.last_seq = e.seq

    @property
    def ended(self) -> bool:
        return self.state in TERMINAL_EXIT


def _follow(servers: ServerChannel, project: str, rollout_id: str, deadline: float) -> int:
    """Follow the rollout to its end, reconnecting across restarts and failovers; the exit
    code says how it ended (cli/servers.py)."""
    follower = _Follower(rollout_pb2_grpc.RolloutServiceStub(servers), project, rollout_id)
    reconnect = Reconnect(servers, deadline)
    try:
        while not follower.ended:
            try:
                follower.stream(reconnect)
            except grpc.RpcError as e:
                reconnect.failed(e)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return TERMINAL_EXIT[follower.state]


# -- drift ------------------------------------------------------------------------------


@click.group(cls=OutputGroup)
def drift() -> None:
    """Nodes whose applied bundle differs from their desired one."""


@drift.command("list")
@server_option
@project_option
@click.option("--open", "open_only", is_flag=True, help="Only episodes not resolved yet.")
@paged
def drift_list(server: str, project: str, open_only: bool, limit: int, all_pages: bool) -> None:
    stub = drift_pb2_grpc.DriftServiceStub(channel(server))

    def page(token: str, size: int) -> Any:
        request = drift_pb2.ListDriftEventsRequest(
            project=project, open_only=open_only, page_size=size, page_token=token
        )
        return stub.ListDriftEvents(request)

    call_pages(page, "events", limit, all_pages, "drift episodes")


@drift.command("remediation")
@server_option
@project_option
@click.argument("setting", type=click.Choice(["on", "off", "show"]))
def drift_remediation(server: str, project: str, setting: str) -> None:
    """Re-assert desired state on drifted nodes of the project (on/off), or show it."""
    stub = drift_pb2_grpc.DriftServiceStub(channel(server))
    if setting == "show":
        call(lambda: stub.GetDriftSettings(drift_pb2.GetDriftSettingsRequest(project=project)))
        return
    request = drift_pb2.UpdateDriftSettingsRequest(project=project, remediate=setting == "on")
    call(lambda: stub.UpdateDriftSettings(request))
