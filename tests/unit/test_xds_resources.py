"""xDS bundles: parsing Envoy resources from a directory, and every way one is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from controlplane.xds import resources, snapshot, types

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
AGG = "type.googleapis.com/envoy.extensions.clusters.aggregate.v3.ClusterConfig"
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ADDRESS = "{address: {socket_address: {address: localhost, port_value: 8080}}}"
CLUSTERS = f"""\
resources:
- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: backend
  type: EDS
  connect_timeout: 1s
  eds_cluster_config: {{eds_config: {{ads: {{}}, resource_api_version: V3}}}}
- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: static
  type: STRICT_DNS
  connect_timeout: 1s
  load_assignment:
    cluster_name: static
    endpoints: [{{lb_endpoints: [{{endpoint: {ADDRESS}}}]}}]
"""
ENDPOINTS = {
    "@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
    "cluster_name": "backend",
    "endpoints": [
        {
            "lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 9000}}}}
            ]
        }
    ],
}
LISTENER = f"""\
"@type": type.googleapis.com/envoy.config.listener.v3.Listener
name: http
address: {{socket_address: {{address: 127.0.0.1, port_value: 10000}}}}
filter_chains:
- filters:
  - name: envoy.filters.network.http_connection_manager
    typed_config:
      "@type": {HCM}
      stat_prefix: ingress
      rds: {{route_config_name: main, config_source: {{ads: {{}}, resource_api_version: V3}}}}
      http_filters:
      - name: envoy.filters.http.router
        typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
---
"@type": type.googleapis.com/envoy.config.route.v3.RouteConfiguration
name: main
virtual_hosts:
- name: all
  domains: ["*"]
  routes:
  - match: {{prefix: /}}
    route: {{cluster: backend}}
"""


def bundle(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def good(root: Path) -> Path:
    return bundle(
        root,
        {"clusters.yaml": CLUSTERS, "eds/endpoints.json": json.dumps(ENDPOINTS), "listeners.yaml": LISTENER},
    )


def errors_of(root: Path) -> str:
    loaded = resources.load(root)
    assert not loaded.ok
    return "\n".join(loaded.errors)


def test_a_bundle_parses_into_resources_with_their_references(tmp_path: Path) -> None:
    loaded = resources.load(good(tmp_path))
    assert loaded.ok, loaded.errors
    assert loaded.files == ("clusters.yaml", "eds/endpoints.json", "listeners.yaml")
    rs = loaded.resources
    assert {t.noun: sorted(rs.of(t)) for t in types.ORDER if rs.of(t)} == {
        "Cluster": ["backend", "static"],
        "ClusterLoadAssignment": ["backend"],
        "Listener": ["http"],
        "RouteConfiguration": ["main"],
    }
    assert rs.of(types.CLUSTER)["backend"].refs == {(types.ENDPOINT.url, "backend")}
    assert rs.of(types.LISTENER)["http"].refs == {(types.ROUTE.url, "main")}
    assert rs.of(types.ROUTE)["main"].refs == {(types.CLUSTER.url, "backend")}
    assert loaded.sources[(types.CLUSTER.url, "static")] == "clusters.yaml: resources[1] (Cluster 'static')"


def test_same_content_gives_the_same_bytes_whatever_the_files(tmp_path: Path) -> None:
    a = resources.load(good(tmp_path / "a")).resources
    # The same resources, split differently, keys reordered, JSON instead of YAML.
    listener, route = LISTENER.split("---\n")
    b_root = bundle(
        tmp_path / "b",
        {
            "all.yaml": CLUSTERS.replace(
                "  connect_timeout: 1s\n  eds_cluster_config", "  eds_cluster_config"
            ).replace("  type: EDS\n", "  type: EDS\n  connect_timeout: 1s\n"),
            "r.yaml": route,
            "l.yaml": listener,
            "e.json": json.dumps(dict(reversed(ENDPOINTS.items()))),
        },
    )
    b = resources.load(b_root).resources
    assert a.digest == b.digest
    assert [r.body for r in a.all()] == [r.body for r in b.all()]
    assert snapshot.diff(a, b).empty


def test_the_diff_names_each_resource_by_type(tmp_path: Path) -> None:
    old = resources.load(good(tmp_path / "a")).resources
    changed = ENDPOINTS | {"endpoints": [{"lb_endpoints": []}]}
    new_root = bundle(
        tmp_path / "b",
        {
            "clusters.yaml": CLUSTERS.split('- "@type"')[0] + '- "@type"' + CLUSTERS.split('- "@type"')[1],  # noqa: PLC0207
            "eds/endpoints.json": json.dumps(changed),
            "listeners.yaml": LISTENER.replace("name: http", "name: web"),
        },
    )
    new = resources.load(new_root).resources
    d = snapshot.diff(old, new)
    assert d.lines() == [
        "+ Listener web",
        "- Cluster static",
        "- Listener http",
        "~ ClusterLoadAssignment backend",
    ]


C = '{"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", '


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '{"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "name": "a", "nme": 1}',
            "c.json (Cluster 'a'): nme: no such field in Cluster (did you mean 'name'?)",
        ),
        (
            C + '"name": "a", "connect_timeout": 5}',
            "c.json (Cluster 'a'): connect_timeout: not a valid Duration",
        ),
        (
            C + '"name": "a", "load_assignment": {"endpoints": [{"lb_endpoints": [{"endpoint": '
            '{"address": {"socket_address": {"port_value": "x"}}}}]}]}}',
            "load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value: "
            "expected an integer, got 'x'",
        ),
        (
            '{"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "name": "a", "type": "NOPE"}',
            "type: 'NOPE' is not a value of DiscoveryType",
        ),
        (
            '{"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "name": ["a"]}',
            "name: expected a string, got a list",
        ),
        (
            '{"@type": "type.googleapis.com/envoy.config.route.v3.VirtualHost", "name": "v"}',
            "c.json: @type: 'type.googleapis.com/envoy.config.route.v3.VirtualHost' is not a resource type",
        ),
        (
            '{"@type": "type.googleapis.com/envoy.config.listener.v3.Listener", "name": "l", '
            '"filter_chains": [{"filters": [{"name": "x", '
            '"typed_config": {"@type": "type.googleapis.com/nope.Nope"}}]}]}',
            "filter_chains[0].filters[0].typed_config.@type: unknown type 'type.googleapis.com/nope.Nope'",
        ),
        (
            '{"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "name": "a", "type": "EDS", '
            '"load_assignment": {}, "cluster_type": {"name": "x"}}',
            "cluster_type: 'type' is already set",
        ),
        ('{"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster"}', "name: a Cluster needs a name"),
        (
            '{"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "name": "a\\u0000b"}',
            "printable",
        ),
        ('{"foo": 1}', "c.json: not xDS resources"),
        ("{nope", "c.json:1:2:"),
    ],
)
def test_a_bad_resource_fails_naming_file_and_field(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in errors_of(bundle(tmp_path, {"c.json": text}))


def test_duplicates_missing_references_and_cycles_are_refused(tmp_path: Path) -> None:
    text = f"""\
- "@type": {CLUSTER}
  name: agg1
  cluster_type: {{name: envoy.clusters.aggregate, typed_config: {{"@type": {AGG}, clusters: [agg2]}}}}
- "@type": {CLUSTER}
  name: agg2
  cluster_type: {{name: envoy.clusters.aggregate, typed_config: {{"@type": {AGG}, clusters: [agg1, ghost]}}}}
- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: agg1
- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: eds
  type: EDS
  eds_cluster_config: {{eds_config: {{ads: {{}}}}}}
- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: external
  type: EDS
  eds_cluster_config:
    eds_config:
      api_config_source: {{api_type: GRPC, grpc_services: [{{envoy_grpc: {{cluster_name: agg1}}}}]}}
"""
    out = errors_of(
        bundle(tmp_path, {"c.yaml": LISTENER.replace("\nname: main\n", "\nname: other\n"), "d.yaml": text})
    )
    assert (
        "d.yaml: [2] (Cluster 'agg1'): Cluster 'agg1' is also defined at d.yaml: [0] (Cluster 'agg1')" in out
    )
    assert (
        "d.yaml: [1] (Cluster 'agg2'): cluster_type.typed_config.clusters[1]: "
        "Cluster 'ghost' is not in the bundle"
    ) in out
    assert (
        "d.yaml: [3] (Cluster 'eds'): name: ClusterLoadAssignment 'eds' is not in the bundle "
        "(endpoints from your own discovery"
    ) in out
    assert (
        "c.yaml (document 1) (Listener 'http'): "
        "filter_chains[0].filters[0].typed_config.rds.route_config_name: "
        "RouteConfiguration 'main' is not in the bundle"
    ) in out
    assert (
        "c.yaml (document 2) (RouteConfiguration 'other'): virtual_hosts[0].routes[0].route.cluster: "
        "Cluster 'backend'"
    ) in out
    assert (
        "d.yaml: [0] (Cluster 'agg1'): reference cycle: Cluster 'agg1' -> Cluster 'agg2' -> Cluster 'agg1'"
        in out
    )
    # A cluster whose endpoints come from the user's own EDS server is fine.
    assert "'external'" not in out


def test_private_keys_are_refused_in_any_file_and_inline(tmp_path: Path) -> None:
    secret = """\
"@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret
name: site
tls_certificate:
  certificate_chain: {filename: /etc/envoy/site.pem}
  private_key: {inline_string: "not really a key"}
"""
    files = {
        "certs/site.key": "-----BEGIN RSA PRIVATE KEY-----\nMIIB\n-----END RSA PRIVATE KEY-----\n",
        "s.yaml": secret,
        "ok.yaml": secret.replace("name: site", "name: ok").replace(
            'private_key: {inline_string: "not really a key"}', "private_key: {filename: /etc/envoy/site.key}"
        ),
    }
    out = errors_of(bundle(tmp_path, files))
    assert out.startswith("certs/site.key: holds a PEM private key")
    assert (
        "s.yaml (Secret 'site'): tls_certificate.private_key.inline_string: holds key material inline" in out
    )
    assert "'ok'" not in out


def test_oversized_resources_and_deep_nesting_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(resources, "MAX_RESOURCE_BYTES", 200)
    routes = [{"match": {"prefix": f"/{i}"}, "route": {"cluster": "c"}} for i in range(20)]
    big = {
        "@type": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
        "name": "big",
        "virtual_hosts": [{"name": "v", "domains": ["*"], "routes": routes}],
    }
    out = errors_of(bundle(tmp_path / "a", {"r.json": json.dumps(big)}))
    assert "r.json (RouteConfiguration 'big'):" in out and "over the 200-byte limit for a resource" in out
    deep: dict[str, object] = {"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "name": "d"}
    node = deep
    for _ in range(80):
        child: dict[str, object] = {}
        node["metadata"] = {"filter_metadata": {"x": child}}
        node = child
    out = errors_of(bundle(tmp_path / "b", {"d.json": json.dumps(deep)}))
    assert "d.json" in out


def test_a_flood_of_errors_is_bounded(tmp_path: Path) -> None:
    items = [
        {"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "name": f"c{i}", "bogus": 1}
        for i in range(500)
    ]
    loaded = resources.load(bundle(tmp_path, {"c.json": json.dumps(items)}))
    assert len(loaded.errors) == resources.MAX_ERRORS + 1
    assert "more errors not shown" in loaded.errors[-1]
