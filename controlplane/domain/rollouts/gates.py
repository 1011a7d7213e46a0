"""Health gates: is every node of a step healthy on fresh data?

A node passes only on a heartbeat that arrived after it activated the bundle, reports
that bundle, and is not stale. Missing, old or foreign data fails: a silent node never
counts as a healthy one, a node that reports no health is not healthy, and a limit on a
metric the heartbeat does not carry fails ("no error_rate reported") instead of reading
it as 0.0.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from controlplane.domain.model.facts import NodeFacts
from controlplane.domain.model.fleet import Health
from controlplane.domain.model.rollouts import Gates


@dataclass(frozen=True, slots=True)
class GateResult:
    passed: bool
    checked: int
    # The first few failures, "node: why", for events and the reason of a rollback.
    failures: tuple[str, ...] = ()
    failing: int = 0
    summary_text: str = ""

    def summary(self) -> str:
        if self.summary_text:
            return self.summary_text
        if self.passed:
            return f"{self.checked} node(s) healthy"
        more = f" (+{self.failing - len(self.failures)} more)" if self.failing > len(self.failures) else ""
        return f"{self.failing} of {self.checked} node(s) failing: " + "; ".join(self.failures) + more


# Enough examples in a reason to act on, short enough for an event or a log line.
_MAX_EXAMPLES = 3


def node_problem(
    gates: Gates,
    facts: NodeFacts,
    digest: str,
    activated_at: datetime | None,
    now: datetime,
    stale: timedelta,
) -> str:
    """Why `facts` fails the gates ("" when it passes)."""
    beat = facts.heartbeat
    if beat is None:
        return "no heartbeat"
    if activated_at is not None and beat.received_at <= activated_at:
        return "no heartbeat since it activated the bundle"
    if now - beat.received_at > stale:
        return f"last heartbeat {int((now - beat.received_at).total_seconds())}s ago"
    if beat.applied_digest != digest:
        return f"heartbeat reports {beat.applied_digest or 'no bundle'}"
    m = beat.metrics
    if gates.require_healthy and m.health is not Health.HEALTHY:
        return "no health reported" if m.health is Health.UNKNOWN else f"health {m.health.value}"
    checks = (
        ("error_rate", m.error_rate, gates.max_error_rate),
        ("p99_latency_ms", m.p99_latency_ms, gates.max_p99_latency_ms),
        ("cpu_percent", m.cpu_percent, gates.max_cpu_percent),
        ("memory_percent", m.memory_percent, gates.max_memory_percent),
    )
    for name, value, limit in checks:
        if limit is None:
            continue
        if value is None:
            return f"no {name} reported"
        if value > limit:
            return f"{name} {value:g} > {limit:g}"
    return ""


def evaluate(
    gates: Gates,
    nodes: Iterable[tuple[NodeFacts, str, datetime | None]],
    now: datetime,
    stale: timedelta,
) -> GateResult:
    """Check (facts, expected digest, activation time) of every node the gates cover.
    Without any gate nothing is checked: freshness only matters for a gate to judge.
    With gates, no node at all fails: a gate passes only on a node shown healthy."""
    if gates.none:
        return GateResult(True, 0, summary_text="no gates")
    checked, failing = 0, 0
    examples: list[str] = []
    for facts, digest, activated_at in nodes:
        checked += 1
        problem = node_problem(gates, facts, digest, activated_at, now, stale)
        if problem:
            failing += 1
            if len(examples) < _MAX_EXAMPLES:
                examples.append(f"{facts.node_id}: {problem}")
    if not checked:
        return GateResult(False, 0, summary_text="no node to evaluate: none is ACTIVE and online")
    return GateResult(failing == 0, checked, tuple(examples), failing)
