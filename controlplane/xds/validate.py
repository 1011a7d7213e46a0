"""Envoy's own check of a bundle's resources: `envoy --mode validate` on a bootstrap
that embeds them.

Parsing into v3 messages catches what protobuf can see; Envoy checks far more (regexes,
constraints of its API, extensions it knows). Listeners, clusters and secrets go into
`static_resources`; each route configuration a listener fetches over ADS is inlined into
its connection manager, and each EDS cluster's endpoints into the cluster, so Envoy sees
all of it. Nothing is bound or connected in validate mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from controlplane.proxies import binaries
from controlplane.xds import catalog, types
from controlplane.xds.snapshot import ResourceSet

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
# Envoy starts and checks a large configuration in a second or two; this is for a
# machine under load, not for Envoy's own work.
TIMEOUT = 60.0
MAX_OUTPUT = 16 * 1024


@dataclass(frozen=True)
class Verdict:
    ok: bool
    output: str


def _dict(rtype: types.ResourceType, body: bytes) -> dict[str, Any]:
    message = rtype.message()
    message.ParseFromString(body)
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def validation_bootstrap(resources: ResourceSet) -> dict[str, Any]:
    """A bootstrap holding every resource of `resources`, for `envoy --mode validate`."""
    catalog.load()
    routes = {n: _dict(types.ROUTE, r.body) for n, r in resources.of(types.ROUTE).items()}
    cla = {n: _dict(types.ENDPOINT, r.body) for n, r in resources.of(types.ENDPOINT).items()}
    listeners = [
        _inline_routes(_dict(types.LISTENER, r.body), routes) for r in resources.of(types.LISTENER).values()
    ]
    clusters = [
        _inline_endpoints(_dict(types.CLUSTER, r.body), cla) for r in resources.of(types.CLUSTER).values()
    ]
    secrets = [_dict(types.SECRET, r.body) for r in resources.of(types.SECRET).values()]
    unused = sorted(set(routes) - _used_routes(resources))
    static: dict[str, Any] = {
        "listeners": listeners,
        "clusters": [_ads_cluster(), *clusters],
        "secrets": secrets,
    }
    # A route configuration no listener fetches is still checked, under a listener of its own.
    for i, name in enumerate(unused):
        static["listeners"].append(_route_holder(i, routes[name]))
    return {
        "node": {"id": "validate", "cluster": "validate"},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-validate"}}],
            }
        },
        "static_resources": static,
    }


def _used_routes(resources: ResourceSet) -> set[str]:
    return {n for r in resources.of(types.LISTENER).values() for (u, n) in r.refs if u == types.ROUTE.url}


def _walk(value: Any) -> Any:
    if isinstance(value, dict):
        yield value
        for v in value.values():
            yield from _walk(v)
    elif isinstance(value, list):
        for v in value:
            yield from _walk(v)


def _inline_routes(listener: dict[str, Any], routes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    for d in list(_walk(listener)):
        if d.get("@type") == HCM and "rds" in d:
            source = d["rds"].get("config_source", {})
            name = d["rds"].get("route_config_name", "")
            if ("ads" in source or "self" in source) and name in routes:
                del d["rds"]
                d["route_config"] = routes[name]
    return listener


def _inline_endpoints(cluster: dict[str, Any], cla: dict[str, dict[str, Any]]) -> dict[str, Any]:
    eds = cluster.get("eds_cluster_config", {})
    source = eds.get("eds_config", {})
    name = eds.get("service_name") or cluster.get("name", "")
    if cluster.get("type") == "EDS" and ("ads" in source or "self" in source) and name in cla:
        del cluster["eds_cluster_config"]
        cluster["type"] = "STATIC"
        cluster["load_assignment"] = {**cla[name], "cluster_name": cluster.get("name", "")}
    return cluster


def _ads_cluster() -> dict[str, Any]:
    return {
        "name": "xds-validate",
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {"cluster_name": "xds-validate", "endpoints": []},
    }


def _route_holder(i: int, route: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": f"validate-routes-{i}",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 1}},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": HCM,
                            "stat_prefix": f"validate{i}",
                            "route_config": route,
                            "http_filters": [
                                {
                                    "name": "envoy.filters.http.router",
                                    "typed_config": {"@type": ROUTER},
                                }
                            ],
                        },
                    }
                ]
            }
        ],
    }


async def run(resources: ResourceSet, limit: float = TIMEOUT, binary: Path | None = None) -> Verdict:
    """`envoy --mode validate` on `resources`, stopped after `limit` seconds; its verdict
    and (the last part of) its output."""
    envoy = binary or binaries.locate("envoy").path
    config = await asyncio.to_thread(validation_bootstrap, resources)
    with tempfile.TemporaryDirectory(prefix="xds-validate-") as tmp:
        path = Path(tmp) / "bootstrap.json"
        path.write_text(json.dumps(config))
        proc = await asyncio.create_subprocess_exec(
            str(envoy),
            "--mode",
            "validate",
            "-c",
            str(path),
            "--log-level",
            "error",
            "--disable-hot-restart",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tmp},
            start_new_session=True,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), limit)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            return Verdict(False, f"envoy --mode validate took longer than {limit:g}s and was stopped")
    text = out.decode(errors="replace").strip()[-MAX_OUTPUT:]
    text = text.replace(str(path), "bootstrap.json")
    return Verdict(proc.returncode == 0, text)
