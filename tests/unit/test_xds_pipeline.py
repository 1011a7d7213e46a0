"""xDS bundles through the existing pipeline's shapes: a ValidationResult, and the
structure domain/bundles/risk.py scores, judged per resource by its unchanged rules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from envoy.extensions.transport_sockets.tls.v3 import tls_pb2

from controlplane.domain.bundles import risk
from controlplane.domain.bundles.archive.manifest import Entry, Manifest
from controlplane.domain.model.bundles import RiskLevel
from controlplane.xds import pipeline, resources
from controlplane.xds.snapshot import ResourceSet
from tests.support.xds import listener, resource, web


def facts(digest: str, rs: ResourceSet) -> risk.Facts:
    manifest = Manifest((Entry("xds.yaml", 1, digest * 4),))
    return risk.Facts(digest, manifest, pipeline.structure(rs))


def rules(old: ResourceSet, new: ResourceSet) -> dict[str, RiskLevel]:
    assessment = risk.assess(facts("a" * 16, old), facts("b" * 16, new))
    return {f.rule: f.level for f in assessment.findings}


def with_tls(rs: ResourceSet, sni: str) -> ResourceSet:
    items = [r for r in rs.all() if r.name != "http"]
    m: Any = listener("http", "main")
    ctx = tls_pb2.DownstreamTlsContext()
    ctx.common_tls_context.tls_certificate_sds_secret_configs.add(name=sni)
    m.filter_chains[0].transport_socket.name = "envoy.transport_sockets.tls"
    m.filter_chains[0].transport_socket.typed_config.Pack(ctx)
    return ResourceSet([*items, resource(m)])


def test_risk_scores_xds_bundles_per_resource() -> None:
    v1 = web("v1", clusters=["a", "b"], route_to="a")
    # Endpoints of an upstream changed; a route moved to another cluster.
    assert rules(v1, web("v2", clusters=["a", "b"], route_to="b")) == {
        "upstream-changed": RiskLevel.MEDIUM,
        "routes-changed": RiskLevel.LOW,
        "files-changed": RiskLevel.LOW,
    }
    # A cluster removed.
    assert rules(v1, web("v1", clusters=["a"], route_to="a"))["upstream-removed"] is RiskLevel.HIGH
    # TLS added to the listener, then its certificate reference changed.
    tls = with_tls(v1, "site")
    assert rules(v1, tls)["tls-changed"] is RiskLevel.HIGH
    assert rules(tls, with_tls(v1, "other"))["tls-changed"] is RiskLevel.HIGH
    assert pipeline.structure(tls)["listeners"]["http"]["protocol"] == "https"


def test_validation_result_carries_the_errors(tmp_path: Path) -> None:
    (tmp_path / "c.json").write_text('{"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster"}')
    result = pipeline.validation_result(resources.load(tmp_path))
    assert not result.ok and result.validator == "xds:*.yaml,*.yml,*.json"
    assert "c.json (Cluster): name: a Cluster needs a name" in result.output
    (tmp_path / "c.json").write_text(
        '{"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "name": "a"}'
    )
    ok = pipeline.validation_result(resources.load(tmp_path))
    assert ok.ok and ok.output == "1 resource(s) in 1 file(s)"
