"""The CycloneDX SBOM every bundle carries at `.bundle/sbom.cdx.json` (cyclonedx-python-lib).

Components are the bundle's files (type `file`, SHA-256 hash, size); services are what a
KDL configuration declares: listeners (with their address as endpoint) and upstreams
(with their targets), each upstream listing the routes that send traffic to it as
`controlplane:route` properties. The output is reproducible:
the serial number is derived from the manifest digest, no timestamp or tool version is
written, and the JSON is re-serialized with sorted keys.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from cyclonedx.model import HashAlgorithm, HashType, Property
from cyclonedx.model.bom import Bom
from cyclonedx.model.component import Component, ComponentType
from cyclonedx.model.dependency import Dependency
from cyclonedx.model.service import Service
from cyclonedx.output.json import JsonV1Dot6

from controlplane.domain.bundles.archive.kdl_config import Structure
from controlplane.domain.bundles.archive.manifest import Manifest

# A fixed namespace: the serial number is a function of the content only.
_NAMESPACE = uuid.UUID("6f1d3c1e-2f0b-5a7e-9c44-0b6a1c5d2e90")
_PREFIX = "controlplane:"


def _linear_dependencies(bom: Bom) -> Bom:
    """Give `bom` a dependency registration that is a set lookup.

    The library's `register_dependency` scans every registered dependency for each
    component and service, which makes serializing ten thousand files quadratic (minutes).
    We register no dependency edges, only the entries, so a set of refs is enough.
    """
    seen: set[str] = set()
    original = bom.register_dependency

    def register(target: Any, depends_on: Any = None) -> None:
        if depends_on:
            original(target, depends_on)
            return
        ref = str(target.bom_ref)
        if ref not in seen:
            seen.add(ref)
            bom.dependencies.add(Dependency(ref=target.bom_ref))

    bom.register_dependency = register  # type: ignore[method-assign]
    return bom


def build(manifest: Manifest, structure: Structure) -> bytes:
    components = []
    for entry in manifest.entries:
        props = [Property(name=f"{_PREFIX}path", value=entry.path)]
        hashes = []
        if entry.is_link:
            props.append(Property(name=f"{_PREFIX}symlink", value=entry.link))
        else:
            props.append(Property(name=f"{_PREFIX}size_bytes", value=str(entry.size)))
            hashes.append(HashType(alg=HashAlgorithm.SHA_256, content=entry.sha256))
        components.append(
            Component(
                name=entry.path,
                type=ComponentType.FILE,
                bom_ref=f"file:{entry.path}",
                hashes=hashes,
                properties=props,
            )
        )
    services = []
    for ident, listener in structure.get("listeners", {}).items():
        props = [Property(name=f"{_PREFIX}kind", value="listener")]
        if listener.get("protocol"):
            props.append(Property(name=f"{_PREFIX}protocol", value=listener["protocol"]))
        if listener.get("tls"):
            props.append(Property(name=f"{_PREFIX}tls", value=listener["tls"]))
        services.append(
            Service(
                name=f"listener:{ident}",
                bom_ref=f"listener:{ident}",
                endpoints=[listener["address"]] if listener.get("address") else None,
                properties=props,
            )
        )
    # Routes are not services of their own: each is listed on the upstream it sends
    # traffic to (a route without one on the `routes` entry). Thousands of routes would
    # otherwise be thousands of services.
    routes: dict[str, list[str]] = {}
    for ident, route in structure.get("routes", {}).items():
        routes.setdefault(route.get("upstream") or "", []).append(ident)
    for ident, upstream in structure.get("upstreams", {}).items():
        props = [Property(name=f"{_PREFIX}kind", value="upstream")]
        props += [Property(name=f"{_PREFIX}route", value=r) for r in routes.pop(ident, [])]
        services.append(
            Service(
                name=f"upstream:{ident}",
                bom_ref=f"upstream:{ident}",
                endpoints=upstream.get("targets") or None,
                properties=props,
            )
        )
    unbound = [r for rs in routes.values() for r in rs]
    if unbound:
        props = [Property(name=f"{_PREFIX}kind", value="routes")]
        props += [Property(name=f"{_PREFIX}route", value=r) for r in unbound]
        services.append(Service(name="routes", bom_ref="routes", properties=props))
    bom = _linear_dependencies(Bom(components=components, services=services))
    bom.serial_number = uuid.uuid5(_NAMESPACE, manifest.digest())
    body: dict[str, Any] = json.loads(JsonV1Dot6(bom).output_as_string())
    # No wall clock in the archive: the same files must give the same bytes.
    body.get("metadata", {}).pop("timestamp", None)
    if not body.get("metadata"):
        body.pop("metadata", None)
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
