"""The periodic bundle garbage collection (see domain/bundles/gc.py for what it takes)."""

from __future__ import annotations

import logging

from controlplane.domain.audit.context import acting_as, system
from controlplane.domain.bundles.gc import BlobCollector

log = logging.getLogger(__name__)


async def collect_bundles(collector: BlobCollector) -> None:
    with acting_as(system("bundle-gc")):
        report = await collector.collect()
    if report.orphans or report.purged:
        log.info("bundle gc: %d orphan archive(s) deleted, %d purged", report.orphans, report.purged)
