"""Webhook gates: calls out to the operator's systems that a rollout waits on
(docs/rollouts.md, "Webhook gates")."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any


class WebhookPhase(enum.StrEnum):
    # Before the rollout starts (PENDING → RUNNING): a confirm-rollout.
    PRE_ROLLOUT = "pre_rollout"
    # Before each step is promoted (its bake, gates and analyses passed): a
    # confirm-promotion, holding the step like an approval.
    PRE_PROMOTION = "pre_promotion"
    # After each step is done, before the next one starts (a load test, say).
    POST_STEP = "post_step"
    # After the rollout ends: delivered through the notification outbox, at least once.
    POST_ROLLOUT = "post_rollout"


class OnFailure(enum.StrEnum):
    # A receiver outage must not roll back a healthy canary: the default.
    PAUSE = "pause"
    ROLLBACK = "rollback"


@dataclass(frozen=True, slots=True)
class WebhookGate:
    phase: WebhookPhase
    # A notification channel of the project (its URL and HMAC key; kind webhook).
    channel_id: str
    # How long the gate may keep failing before `on_failure`.
    timeout: timedelta = timedelta(minutes=5)
    max_attempts: int = 5
    on_failure: OnFailure = OnFailure.PAUSE

    def to_json(self) -> dict[str, Any]:
        return {
            "phase": self.phase.value,
            "channel_id": self.channel_id,
            "timeout_seconds": self.timeout.total_seconds(),
            "max_attempts": self.max_attempts,
            "on_failure": self.on_failure.value,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> WebhookGate:
        return cls(
            WebhookPhase(d["phase"]),
            d["channel_id"],
            timedelta(seconds=d["timeout_seconds"]),
            d["max_attempts"],
            OnFailure(d["on_failure"]),
        )


@dataclass(frozen=True, slots=True)
class GateCall:
    """One call of a gate and its answer."""

    phase: WebhookPhase
    step: int
    at: datetime
    ok: bool
    status: int
    error: str = ""
