"""Metric analysis: the pure side of judging a step by queries to a metrics provider.

The controller asks `due` which checks of the current step should be measured now, runs
them through the `MetricsProvider` port (the adapter speaks Prometheus's HTTP API) and
hands the measurements to the state machine, which calls `judge` while the step bakes:

- a check is **failed** once more measurements failed than its `failure_limit` — an
  error (provider down, garbage, NaN, no data, several series) is a failed measurement,
  never a pass;
- it is **inconclusive** once more were inconclusive than its `inconclusive_limit`
  (the rollout then pauses for an operator, as an unsure canary should);
- it **passes** once it has `count` measurements and neither of the above.

A step completes only when every check passes (and the bake and gates allow). In dry-run
the verdicts are recorded as events and never act nor hold the step.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from controlplane.domain.kernel.errors import InvalidArgument
from controlplane.domain.model.analysis import Measurement, MetricAnalysis, MetricCheck, Phase

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    ">": operator.gt,
}
_CONDITION = re.compile(r"^\s*result\s*(<=|>=|==|!=|<|>)\s*([-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?)\s*$")
# The placeholders a query may use.
PLACEHOLDERS = ("{{canary}}", "{{baseline}}", "{{rollout}}", "{{step}}")
# What a node id may hold to be put into a query as it is (ids are `n-<hex>`).
_NODE_ID = re.compile(r"[A-Za-z0-9_-]+")
# Stands for a node set that is empty: matches no node id (ids never contain a space).
_NO_NODE = "^ nothing$"


@dataclass(frozen=True, slots=True)
class Condition:
    op: str
    threshold: float

    def holds(self, value: float) -> bool:
        return _OPS[self.op](value, self.threshold)

    def __str__(self) -> str:
        return f"result {self.op} {self.threshold:g}"


def parse_condition(text: str, field: str) -> Condition | None:
    """`result < 0.05` → Condition; "" → None; anything else INVALID_ARGUMENT."""
    if not text.strip():
        return None
    found = _CONDITION.match(text)
    if found is None:
        raise InvalidArgument(
            f"{text[:100]!r} is not `result <op> <number>` with <, <=, >, >=, == or !=", field=field
        )
    threshold = float(found.group(2))
    if not math.isfinite(threshold):
        raise InvalidArgument("the number must be finite", field=field)
    return Condition(found.group(1), threshold)


def classify(check: MetricCheck, value: float) -> tuple[Phase, str]:
    """A measured value's phase under the check's conditions (both given and neither
    holding: inconclusive; only a success condition: failed unless it holds; only a
    failure condition: successful unless it holds)."""
    success = parse_condition(check.success_condition, "success_condition")
    failure = parse_condition(check.failure_condition, "failure_condition")
    if failure is not None and failure.holds(value):
        return Phase.FAILED, f"{value:g}: {failure} holds"
    if success is not None:
        if success.holds(value):
            return Phase.SUCCESSFUL, f"{value:g}: {success} holds"
        if failure is None:
            return Phase.FAILED, f"{value:g}: {success} does not hold"
        return Phase.INCONCLUSIVE, f"{value:g}: neither {success} nor {failure} holds"
    return Phase.SUCCESSFUL, f"{value:g}: {failure} does not hold"


def render(query: str, canary: Sequence[str], baseline: Sequence[str], rollout_id: str, step: int) -> str:
    """The query with its placeholders filled in. Node sets become a regex alternation
    for `node=~"..."`; node ids are letters, digits and `-`, nothing a PromQL string or a
    regex would read specially (an id with anything else is left out)."""

    def alternation(ids: Sequence[str]) -> str:
        return "|".join(i for i in sorted(ids) if _NODE_ID.fullmatch(i)) or _NO_NODE

    return (
        query.replace("{{canary}}", alternation(canary))
        .replace("{{baseline}}", alternation(baseline))
        .replace("{{rollout}}", rollout_id)
        .replace("{{step}}", str(step))
    )


def recorded(detail: Mapping[str, Any]) -> list[Measurement]:
    """The measurements stored on a step (`Step.detail`)."""
    return [Measurement.from_json(m) for m in detail.get("measurements", [])]


def due(analysis: MetricAnalysis, measurements: Sequence[Measurement], now: datetime) -> list[MetricCheck]:
    """The checks to measure now: fewer than `count` measurements, and the last one at
    least `interval` ago (or none yet)."""
    out = []
    for check in analysis.metrics:
        mine = [m for m in measurements if m.metric == check.name]
        if len(mine) >= check.count:
            continue
        if not mine or now - max(m.at for m in mine) >= check.interval:
            out.append(check)
    return out


class Verdict:
    PENDING = "pending"
    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"


def judge(analysis: MetricAnalysis, measurements: Sequence[Measurement]) -> tuple[str, str]:
    """(verdict, reason) over every check: fail beats inconclusive beats pending."""
    verdicts: list[tuple[str, str]] = []
    for check in analysis.metrics:
        mine = [m for m in measurements if m.metric == check.name]
        failed = [m for m in mine if m.failed]
        unsure = [m for m in mine if m.phase is Phase.INCONCLUSIVE]
        if len(failed) > check.failure_limit:
            verdicts.append(
                (
                    Verdict.FAIL,
                    f"{check.name}: {len(failed)} failed measurement(s), limit {check.failure_limit}; "
                    f"last: {failed[-1].reason}",
                )
            )
        elif len(unsure) > check.inconclusive_limit:
            verdicts.append(
                (
                    Verdict.INCONCLUSIVE,
                    f"{check.name}: {len(unsure)} inconclusive measurement(s), limit "
                    f"{check.inconclusive_limit}; last: {unsure[-1].reason}",
                )
            )
        elif len(mine) >= check.count:
            verdicts.append((Verdict.PASS, f"{check.name}: {len(mine) - len(failed)} of {len(mine)} passed"))
        else:
            verdicts.append((Verdict.PENDING, f"{check.name}: {len(mine)} of {check.count} measurement(s)"))
    for wanted in (Verdict.FAIL, Verdict.INCONCLUSIVE, Verdict.PENDING):
        hits = [reason for verdict, reason in verdicts if verdict == wanted]
        if hits:
            return wanted, "; ".join(hits)
    return Verdict.PASS, "; ".join(reason for _, reason in verdicts)
