"""The Envoy bootstrap and `envoy --mode validate`, checked by the real Envoy binary."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pytest

from controlplane.proxies import binaries
from controlplane.xds import validate
from controlplane.xds.bootstrap import BootstrapSpec, Tls, bootstrap
from controlplane.xds.snapshot import ResourceSet
from controlplane.xds.types import ROUTE
from tests.support.certs import CertificateAuthority
from tests.support.xds import resource, route, web


def envoy_validates(config: dict[str, object], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "bootstrap.json"
    path.write_text(json.dumps(config))
    return subprocess.run(
        [
            str(binaries.locate("envoy").path),
            "--mode",
            "validate",
            "-c",
            str(path),
            "--disable-hot-restart",
            "-l",
            "error",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("mode", ["sotw", "delta"])
def test_the_bootstrap_names_the_node_carries_the_credential_and_envoy_accepts_it(
    mode: str, tmp_path: Path
) -> None:
    spec = BootstrapSpec("edge-1", "default", "cp.example.com", 50051, "edge-1.cpn_x", mode, 9901)  # type: ignore[arg-type]
    config = bootstrap(spec)
    assert config["node"] == {"id": "edge-1", "cluster": "default"}
    ads = config["dynamic_resources"]["ads_config"]
    assert ads["api_type"] == ("GRPC" if mode == "sotw" else "DELTA_GRPC")
    assert ads["grpc_services"][0]["initial_metadata"] == [
        {"key": "authorization", "value": "Bearer edge-1.cpn_x"}
    ]
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    sink = config["stats_sinks"][0]["typed_config"]
    assert sink["grpc_service"]["initial_metadata"] == ads["grpc_services"][0]["initial_metadata"]
    assert config["static_resources"]["clusters"][0]["type"] == "STRICT_DNS"
    out = envoy_validates(config, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr


def test_mutual_tls_bootstrap_has_no_bearer_and_envoy_accepts_it(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "pki")
    pair = ca.issue("edge-2", server=False)
    tls = Tls(str(ca.pem), str(pair.cert), str(pair.key), "cp.example.com")
    config = bootstrap(BootstrapSpec("edge-2", "default", "10.0.0.5", 50051, tls=tls, metadata={"zone": "a"}))
    assert "initial_metadata" not in config["dynamic_resources"]["ads_config"]["grpc_services"][0]
    cluster = config["static_resources"]["clusters"][0]
    assert (
        cluster["type"] == "STATIC" and cluster["transport_socket"]["typed_config"]["sni"] == "cp.example.com"
    )
    assert config["node"]["metadata"] == {"zone": "a"}
    out = envoy_validates(config, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    with pytest.raises(ValueError, match="mode"):
        bootstrap(BootstrapSpec("x", "p", "h", 1, mode="rest"))  # type: ignore[arg-type]


def test_envoy_validate_mode_passes_a_good_bundle_and_names_what_envoy_refuses() -> None:
    good = web("v1", clusters=["a", "b"], route_to="b")
    verdict = asyncio.run(validate.run(good))
    assert verdict.ok, verdict.output
    bad = ResourceSet(
        [*[r for r in good.all() if r.type_url != ROUTE.url], resource(route("main", "a", regex="(x"))]
    )
    verdict = asyncio.run(validate.run(bad))
    assert not verdict.ok
    assert "missing )" in verdict.output
