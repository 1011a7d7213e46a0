"""xDS bundles are checked at push: a bundle of Envoy resources that does not hold
together fails, naming the file and the resource; an agent's Envoy bootstrap (its own
`static_resources`) and other proxies' bundles are not taken for one."""

from __future__ import annotations

from typing import Any

from controlplane.api.bundle.v1 import bundle_pb2
from controlplane.xds.pipeline import VALIDATOR
from tests.support.archives import bundle
from tests.support.harness import Harness
from tests.support.proxies import envoy_files, nginx_files
from tests.support.xds import bundle_files, cluster, endpoints, listener, route


async def pushed(harness: Harness, files: dict[str, bytes]) -> Any:
    digest = await harness.upload(bundle(files))
    reply = await harness.bundles.GetBundle(bundle_pb2.GetBundleRequest(project="default", digest=digest))
    return reply.bundle


async def test_xds_bundles_are_checked_at_push(harness: Harness) -> None:
    good = await pushed(
        harness,
        bundle_files([listener("http", "main"), route("main", "app"), cluster("app"), endpoints("app")]),
    )
    assert good.state == bundle_pb2.BUNDLE_STATE_VALID, good.state_reason
    checked = {v.validator: v for v in good.validation}
    assert checked[VALIDATOR].ok and "4 resource(s) in 1 file(s)" in checked[VALIDATOR].output

    # The route sends to a cluster the bundle does not hold.
    broken = await pushed(harness, bundle_files([listener("http", "main"), route("main", "missing")]))
    assert broken.state == bundle_pb2.BUNDLE_STATE_FAILED
    assert (
        "edge/site.json" in broken.state_reason
        and "Cluster 'missing' is not in the bundle" in broken.state_reason
    ), broken.state_reason


async def test_other_bundles_are_not_taken_for_xds(harness: Harness) -> None:
    for files in (envoy_files(18080, 18081), nginx_files(18080, 18081)):
        other = await pushed(harness, files)
        assert other.state == bundle_pb2.BUNDLE_STATE_VALID, other.state_reason
        assert VALIDATOR not in {v.validator for v in other.validation}
