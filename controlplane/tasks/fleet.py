"""Background work of the fleet: marking silent nodes offline."""

from __future__ import annotations

import logging
from datetime import timedelta

from controlplane.domain.audit.context import acting_as, system
from controlplane.domain.fleet.nodes import NodeRegistry

log = logging.getLogger(__name__)


async def sweep_offline(nodes: NodeRegistry, offline_after: timedelta) -> None:
    with acting_as(system("offline-sweep")):
        marked = await nodes.mark_offline(offline_after)
    if marked:
        log.info("marked %d node(s) offline: %s", len(marked), ", ".join(marked[:20]))
