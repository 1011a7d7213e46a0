"""Prometheus metrics of the watch on the metrics port."""

from __future__ import annotations

import asyncio
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from controlplane.api.node.v1 import node_pb2 as npb
from tests.conftest import HarnessFactory
from tests.support.archives import bundle


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


async def test_watch_metrics_move(make_harness: HarnessFactory) -> None:
    h = await make_harness(metrics_listen="127.0.0.1:0")
    port = h.app._metrics_server.server_port
    before = await asyncio.to_thread(scrape, port)
    digest = await h.upload(bundle({"a": b"1"}))
    node = await h.register("n1", {"env": "prod"})
    rec = h.open_watch(node)
    await rec.wait_for(lambda r: "snapshot_end" in r.kinds)
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
    resumed = h.open_watch(node, since=10**9, epoch=rec.epoch)
    await resumed.wait_for(lambda r: "snapshot_end" in r.kinds)
    after = await asyncio.to_thread(scrape, port)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert after["controlplane_watch_streams_open"] - before.get("controlplane_watch_streams_open", 0) == 2
    assert delta("controlplane_watch_bootstraps_total") == 2
    assert delta("controlplane_watch_resets_total{reason=RESET_REASON_AHEAD_OF_HEAD}") == 1
    assert delta("controlplane_watch_nacks_total") == 1
    assert delta("controlplane_watch_deliveries_total") >= 1
    assert delta("controlplane_watch_fanout_latency_seconds_count") >= 1
    assert after["controlplane_watch_head_revision"] >= revision
    assert "controlplane_watch_streams_lagging" in after
    assert "controlplane_watch_bookmarks_total" in after
    await rec.cancel()
    await resumed.cancel()
