"""Waking the rollout driver when a node reports, so a step completes as soon as its
nodes are ACTIVE rather than on the driver's next safety-net tick."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from controlplane.domain.nodes import NodeRegistry


class ReportingNodeRegistry(NodeRegistry):
    """A NodeRegistry that calls `after_report` once a status report is recorded.

    Only reports received by this process wake it; a rollout led by another replica sees
    them on that replica's next tick.
    """

    after_report: Callable[[], None] = staticmethod(lambda: None)

    async def report_status(self, *args: Any, **kwargs: Any) -> None:
        await super().report_status(*args, **kwargs)
        self.after_report()
