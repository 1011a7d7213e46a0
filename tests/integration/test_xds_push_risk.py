"""An xDS bundle's risk at push is scored per resource (docs/xds.md): its listeners,
clusters and routes, by name, against the project's previous valid bundle."""

from __future__ import annotations

from controlplane.api.bundle.v1 import bundle_pb2 as bpb
from tests.support import xds
from tests.support.bundles import create
from tests.support.harness import Harness


def site(*clusters: str, listener_port: int = 10000, route_to: str = "a") -> dict[str, bytes]:
    messages = [xds.listener("http", "main", listener_port), xds.route("main", route_to)]
    for i, name in enumerate(clusters):
        messages += [xds.cluster(name), xds.endpoints(name, 9000 + i)]
    return xds.bundle_files(messages)


async def test_risk_names_the_resources_added_removed_and_changed(harness: Harness) -> None:
    first = (await create(harness.bundles, site("a", "b"))).bundle
    assert first.state == bpb.BUNDLE_STATE_VALID, first.state_reason

    # Cluster `b` removed, listener moved: the same file, judged per resource.
    second = (await create(harness.bundles, site("a", listener_port=10001))).bundle
    assert second.state == bpb.BUNDLE_STATE_VALID, second.state_reason
    assert second.risk.compared_with == first.digest
    findings = {f.rule: f for f in second.risk.findings}
    assert findings["upstream-removed"].level == bpb.RISK_LEVEL_HIGH
    assert findings["upstream-removed"].reason == "upstream(s) removed: 'b'"
    assert "'http'" in findings["listener-changed"].reason, findings["listener-changed"].reason
    assert second.risk.level == bpb.RISK_LEVEL_HIGH

    # A cluster added and the route sent to it: LOW and named.
    third = (await create(harness.bundles, site("a", "c", listener_port=10001, route_to="c"))).bundle
    findings = {f.rule: f for f in third.risk.findings}
    assert (
        findings["upstream-added"].reason == "upstream(s) added: 'c'"
        and findings["upstream-added"].level == bpb.RISK_LEVEL_LOW
    )
    assert "1 changed" in findings["routes-changed"].reason, findings["routes-changed"].reason
    assert "upstream-removed" not in findings and "listener-changed" not in findings, findings

    # `bundle compare` (DiffBundles) judges the same way, from the stored structures.
    diff = await harness.bundles.DiffBundles(
        bpb.DiffBundlesRequest(project="default", from_digest=first.digest, to_digest=third.digest)
    )
    compared = {f.rule: f.reason for f in diff.risk.findings}
    assert compared["upstream-removed"] == "upstream(s) removed: 'b'", compared
    assert compared["upstream-added"] == "upstream(s) added: 'c'", compared
    assert [c.path for c in diff.changes] == ["edge/site.json"], diff.changes
    # ...and lists every resource that differs, by type and name, whatever file holds it.
    by_kind = {
        k: [(c.type_url.rsplit(".", 1)[-1], c.name) for c in diff.resource_changes if c.kind == k]
        for k in (bpb.FILE_CHANGE_KIND_ADDED, bpb.FILE_CHANGE_KIND_REMOVED, bpb.FILE_CHANGE_KIND_MODIFIED)
    }
    assert by_kind[bpb.FILE_CHANGE_KIND_ADDED] == [("Cluster", "c"), ("ClusterLoadAssignment", "c")]
    assert by_kind[bpb.FILE_CHANGE_KIND_REMOVED] == [("Cluster", "b"), ("ClusterLoadAssignment", "b")]
    assert by_kind[bpb.FILE_CHANGE_KIND_MODIFIED] == [("Listener", "http"), ("RouteConfiguration", "main")]


async def test_compare_lists_resources_only_for_two_xds_bundles(harness: Harness) -> None:
    xds_bundle = (await create(harness.bundles, site("a"))).bundle
    other = (await create(harness.bundles, {"limits.yaml": b"rps: 5\n"})).bundle
    assert other.state == bpb.BUNDLE_STATE_VALID, other.state_reason
    diff = await harness.bundles.DiffBundles(
        bpb.DiffBundlesRequest(project="default", from_digest=xds_bundle.digest, to_digest=other.digest)
    )
    assert {c.path for c in diff.changes} == {"edge/site.json", "limits.yaml"}
    assert list(diff.resource_changes) == []
