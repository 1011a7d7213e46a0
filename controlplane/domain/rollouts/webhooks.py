"""Webhook gates in the state machine, pure: whether a phase's gate lets the rollout go
on, waits (and whether a call is due), or gave up.

A gate is called (by the controller, through the `WebhookCaller` port) until it answers
2xx — attempts spaced by an exponential backoff (1 s, 2 s, 4 s, ... at most 30 s) — and
holds its phase meanwhile, like an approval. After `max_attempts` failed calls, or once
it has failed for `timeout`, it gives up, and the machine acts on the gate's
`on_failure`: pause the rollout (the default: a receiver outage must not roll back a
healthy canary) or fail it (rollback under auto-rollback). A pre-rollout gate that gives
up cancels the rollout: nothing was written, there is nothing to pause or roll back.
Each call's outcome is kept on its step (`Step.detail["webhooks"]`) and is an event;
resuming a paused rollout gives the current step's failed gates a fresh start.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from controlplane.domain.model.facts import World
from controlplane.domain.model.rollouts import Step
from controlplane.domain.model.webhooks import WebhookGate, WebhookPhase
from controlplane.domain.rollouts.run import EventKind, Run

# Between calls of a failing gate: quick over a blip, at most every 30 s.
BACKOFF_BASE = timedelta(seconds=1)
BACKOFF_CAP = timedelta(seconds=30)

PASS, WAIT, FAIL = "pass", "wait", "fail"


def backoff(attempts: int) -> timedelta:
    wait: timedelta = BACKOFF_BASE * (2 ** min(max(attempts - 1, 0), 10))
    return min(BACKOFF_CAP, wait)


def gate_of(run: Run, phase: WebhookPhase) -> WebhookGate | None:
    return next((g for g in run.spec.webhooks if g.phase is phase), None)


def check(run: Run, world: World, step: Step, phase: WebhookPhase) -> tuple[str, str]:
    """(PASS | WAIT | FAIL, reason) for `phase`'s gate at `step`; records a call the
    world brings and asks for the next one when it is due (`run.needs_gate`)."""
    gate = gate_of(run, phase)
    if gate is None:
        return PASS, ""
    now = world.now
    hooks: dict[str, Any] = dict(step.detail.get("webhooks", {}))
    state: dict[str, Any] = dict(hooks.get(phase.value, {}))
    if state.get("ok"):
        return PASS, ""
    call = world.gate_call
    if call is not None and call.phase is phase and call.step == step.index:
        state["attempts"] = state.get("attempts", 0) + 1
        state.setdefault("first_at", call.at.isoformat())
        state.update(last_at=call.at.isoformat(), ok=call.ok, status=call.status, error=call.error[:500])
        hooks[phase.value] = state
        step = run.set_step(step, detail={**step.detail, "webhooks": hooks})
        answer = f"answered {call.status}" if call.ok else f"failed ({call.error[:200]})"
        run.event(
            EventKind.WEBHOOK,
            f"step {step.index} webhook {phase.value}, attempt {state['attempts']}: {answer}",
            step=step.index,
            phase=phase.value,
            ok=call.ok,
            status=call.status,
        )
        if call.ok:
            return PASS, ""
    attempts = int(state.get("attempts", 0))
    first = _at(state.get("first_at"))
    if attempts >= gate.max_attempts or (first is not None and now - first >= gate.timeout):
        return FAIL, (
            f"webhook gate {phase.value} at step {step.index} failed {attempts} time(s)"
            + (f" over {(now - first).total_seconds():.0f}s" if first is not None else "")
            + f": {state.get('error', '')}"
        )
    last = _at(state.get("last_at"))
    if last is None or now - last >= backoff(attempts):
        run.needs_gate = (phase, step.index)
    return WAIT, ""


def fresh_start(step: Step) -> dict[str, Any]:
    """The step's detail with its failed gates forgotten (a resume tries them again)."""
    hooks = {k: v for k, v in step.detail.get("webhooks", {}).items() if v.get("ok")}
    return {**step.detail, "webhooks": hooks}


def _at(text: Any) -> datetime | None:
    return datetime.fromisoformat(text) if isinstance(text, str) else None
