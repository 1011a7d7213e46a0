"""The CycloneDX SBOM every bundle carries at `.bundle/sbom.cdx.json` (cyclonedx-python-lib).

Components are the bundle's files (type `file`, SHA-256 hash, size); services are what a
KDL configuration declares: listeners (with their address as endpoint), upstreams (with
their targets) and routes (with the upstream they name). The output is reproducible:
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
from cyclonedx.model.service import Service
from cyclonedx.output.json import JsonV1Dot6

from controlplane.archives.kdl_config import Structure
from controlplane.archives.manifest import Manifest

# A fixed namespace: the serial number is a function of the content only.
_NAMESPACE = uuid.UUID("6f1d3c1e-2f0b-5a7e-9c44-0b6a1c5d2e90")
_PREFIX = "controlplane:"


def build(manifest: Manifest, structure: Structure) -> bytes:
    bom = Bom()
    bom.serial_number = uuid.uuid5(_NAMESPACE, manifest.digest())
    for entry in manifest.entries:
        props = [Property(name=f"{_PREFIX}path", value=entry.path)]
        hashes = []
        if entry.is_link:
            props.append(Property(name=f"{_PREFIX}symlink", value=entry.link))
        else:
            props.append(Property(name=f"{_PREFIX}size_bytes", value=str(entry.size)))
            hashes.append(HashType(alg=HashAlgorithm.SHA_256, content=entry.sha256))
        bom.components.add(
            Component(
                name=entry.path,
                type=ComponentType.FILE,
                bom_ref=f"file:{entry.path}",
                hashes=hashes,
                properties=props,
            )
        )
    for ident, listener in structure.get("listeners", {}).items():
        props = [Property(name=f"{_PREFIX}kind", value="listener")]
        if listener.get("protocol"):
            props.append(Property(name=f"{_PREFIX}protocol", value=listener["protocol"]))
        if listener.get("tls"):
            props.append(Property(name=f"{_PREFIX}tls", value=listener["tls"]))
        bom.services.add(
            Service(
                name=f"listener:{ident}",
                bom_ref=f"listener:{ident}",
                endpoints=[listener["address"]] if listener.get("address") else None,
                properties=props,
            )
        )
    for ident, upstream in structure.get("upstreams", {}).items():
        bom.services.add(
            Service(
                name=f"upstream:{ident}",
                bom_ref=f"upstream:{ident}",
                endpoints=upstream.get("targets") or None,
                properties=[Property(name=f"{_PREFIX}kind", value="upstream")],
            )
        )
    for ident, route in structure.get("routes", {}).items():
        props = [Property(name=f"{_PREFIX}kind", value="route")]
        if route.get("upstream"):
            props.append(Property(name=f"{_PREFIX}upstream", value=route["upstream"]))
        bom.services.add(Service(name=f"route:{ident}", bom_ref=f"route:{ident}", properties=props))
    body: dict[str, Any] = json.loads(JsonV1Dot6(bom).output_as_string())
    # No wall clock in the archive: the same files must give the same bytes.
    body.get("metadata", {}).pop("timestamp", None)
    if not body.get("metadata"):
        body.pop("metadata", None)
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
