"""Prometheus metrics of the watch on the metrics port: each one moves when, and by as
much as, what it counts happens."""

from __future__ import annotations

import asyncio
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from controlplane.api.node.v1 import node_pb2 as npb
from controlplane.api.watch.v1 import watch_pb2 as wpb
from controlplane.watch.stream import MAX_PENDING
from tests.conftest import HarnessFactory
from tests.support.archives import bundle
from tests.support.eventually import eventually
from tests.support.sinks import RecordingSink


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


class Scraper:
    """Differences between one scrape and the next."""

    def __init__(self, port: int):
        self.port = port
        self.last: dict[str, float] = {}

    async def step(self) -> dict[str, float]:
        now = await asyncio.to_thread(scrape, self.port)
        names = set(now) | set(self.last)
        delta = {name: now.get(name, 0.0) - self.last.get(name, 0.0) for name in names}
        self.last = now
        return delta


BOOTSTRAPS = "controlplane_watch_bootstraps_total"
RESUMES = "controlplane_watch_resumes_total"
BOOKMARKS = "controlplane_watch_bookmarks_total"
OPEN = "controlplane_watch_streams_open"
LAGGING = "controlplane_watch_streams_lagging"
LAGGING_TOTAL = "controlplane_watch_stream_overflows_total"


async def test_watch_metrics_move(make_harness: HarnessFactory) -> None:
    h = await make_harness(metrics_listen="127.0.0.1:0")
    metrics = Scraper(h.app._metrics_server.server_port)
    await metrics.step()
    digest = await h.upload(bundle({"a": b"1"}))
    node = await h.register("n1", {"env": "prod"})

    rec = h.open_watch(node)
    await rec.wait_for(lambda r: "snapshot_end" in r.kinds)
    delta = await metrics.step()
    assert (delta[OPEN], delta[BOOTSTRAPS], delta[RESUMES]) == (1, 1, 0)

    # Liveness bookmarks are counted as they are sent: at least as many as arrived.
    await rec.wait_for(lambda r: len(r.of("bookmark")) >= 2, what="two liveness bookmarks")
    received = len(rec.of("bookmark"))
    delta = await metrics.step()
    assert delta[BOOKMARKS] >= received >= 2

    revision = await h.assign(digest, selector="env=prod")
    desired = await rec.wait_digest(digest)
    await h.nodes.ReportStatus(
        npb.ReportStatusRequest(
            node_id=node.node_id,
            stream_id=rec.stream_id,
            revision=desired.revision,
            digest=digest,
            phase=npb.REPORT_PHASE_FAILED,
            error="validation failed",
        ),
        metadata=node.metadata,
    )
    delta = await metrics.step()
    assert delta["controlplane_fleet_reports_failed_total"] == 1
    assert delta["controlplane_watch_deliveries_total"] >= 1
    assert delta["controlplane_watch_fanout_latency_seconds_count"] >= 1
    assert metrics.last["controlplane_watch_head_revision"] >= revision

    # A resume from the node's cursor is a resume, not a bootstrap ...
    cursor = rec.last_revision()
    await rec.cancel()
    resumed = h.open_watch(node, since=cursor, epoch=rec.epoch)
    await resumed.wait_for(lambda r: "bookmark" in r.kinds)
    assert resumed.of("started")[0].mode == wpb.STREAM_MODE_RESUME
    delta = await metrics.step()
    assert (delta[RESUMES], delta[BOOTSTRAPS], delta[OPEN]) == (1, 0, 0)
    # ... and a cursor ahead of the head is a reset and a bootstrap.
    ahead = h.open_watch(node, since=10**9, epoch=rec.epoch)
    await ahead.wait_for(lambda r: "snapshot_end" in r.kinds)
    delta = await metrics.step()
    assert delta["controlplane_watch_resets_total{reason=RESET_REASON_AHEAD_OF_HEAD}"] == 1
    assert (delta[BOOTSTRAPS], delta[RESUMES], delta[OPEN]) == (1, 0, 1)
    await resumed.cancel()
    await ahead.cancel()


async def test_lagging_metrics_move(make_harness: HarnessFactory) -> None:
    h = await make_harness(metrics_listen="127.0.0.1:0")
    metrics = Scraper(h.app._metrics_server.server_port)
    digests = [await h.upload(bundle({"a": str(i).encode()})) for i in range(2)]
    node = await h.register("slow")
    # A consumer whose first write never returns (a reader that stopped reading).
    stuck = RecordingSink()
    stuck.block()
    stream = h.app.hub.open(node.node_id, 0, h.app.hub.epoch, stuck)
    await metrics.step()
    for i in range(MAX_PENDING + 2):
        await h.assign(digests[i % 2], nodes=[node.node_id])
    assert stream.lagging
    delta = await metrics.step()
    assert (delta[LAGGING_TOTAL], delta[LAGGING]) == (1, 1)
    stuck.unblock()

    async def caught_up() -> None:
        assert not stream.lagging
        assert (await metrics.step())[LAGGING] == -1

    await eventually(caught_up, what="the lagging stream caught up")
    assert stuck.of("desired")[-1].digest == digests[(MAX_PENDING + 1) % 2]
    h.app.hub.close(stream)
