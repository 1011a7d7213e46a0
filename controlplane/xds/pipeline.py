"""What the bundle pipeline needs from an xDS bundle, in the shapes it already uses.

- `validation_result`: the xDS checks as one `ValidationResult`, beside the project's
  other validators (domain/bundles/validators.py);
- `structure`: the resources as the `Structure` that risk scoring reads
  (domain/bundles/archive/kdl_config.py: listeners, upstreams, routes, tls, auth, rate-limit blocks,
  each with a fingerprint), so `domain/bundles/risk.py` judges an xDS bundle per resource with
  its existing rules: a listener or cluster removed, TLS or auth changed, many routes.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from google.protobuf import text_format

from controlplane.domain.bundles.archive.formats import ConfigFormat, parse
from controlplane.domain.bundles.validators import ProxyCheck, cap_output
from controlplane.domain.model.bundles import ValidationResult
from controlplane.proxies.binaries import Binary
from controlplane.xds import refs, types, validate
from controlplane.xds.resources import EXTENSIONS, Loaded, load
from controlplane.xds.snapshot import ResourceSet, canonical

VALIDATOR = "xds:" + ",".join(f"*{ext}" for ext in EXTENSIONS)
_AUTH = {
    "envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
    "envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
    "envoy.extensions.filters.http.rbac.v3.RBAC",
    "envoy.extensions.filters.http.basic_auth.v3.BasicAuth",
    "envoy.extensions.filters.http.oauth2.v3.OAuth2",
    "envoy.extensions.filters.network.rbac.v3.RBAC",
    "envoy.extensions.filters.network.ext_authz.v3.ExtAuthz",
}
_RATE_LIMITS = {
    "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
    "envoy.extensions.filters.http.ratelimit.v3.RateLimit",
    "envoy.extensions.filters.network.local_ratelimit.v3.LocalRateLimit",
    "envoy.extensions.filters.network.ratelimit.v3.RateLimit",
}
_TLS = {
    "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
    "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
}


# A file is read for these only up to this size before it counts as a candidate.
_SNIFF_BYTES = 4 * 1024 * 1024
_SERVED = re.compile(
    rb"type\.googleapis\.com/(?:"
    + b"|".join(re.escape(t.url.split("/", 1)[1].encode()) for t in types.ORDER)
    + rb")"
)


class XdsCheck:
    """The xDS checks at push (`resources.load`), for a bundle that holds xDS resources:
    a file of the bundle names a served type (Listener, Cluster...) as a top-level
    resource. An Envoy bootstrap for an agent's Envoy (its `static_resources`) is not one."""

    def wanted(self, root: Path, paths: Sequence[str]) -> bool:
        for path in paths:
            if os.path.splitext(path)[1].lower() not in EXTENSIONS:
                continue
            try:
                with (root / path).open("rb") as f:
                    head = f.read(_SNIFF_BYTES)
            except OSError:
                continue
            if _SERVED.search(head) and _top_level_resources(root, path):
                return True
        return False

    def run(self, root: Path, paths: Sequence[str]) -> ValidationResult:
        started = time.monotonic()
        loaded = load(root, paths)
        return validation_result(loaded, timedelta(seconds=time.monotonic() - started))

    def structure(self, root: Path, paths: Sequence[str]) -> dict[str, dict[str, Any]] | None:
        """The resources as risk scoring reads them (`structure` below); None when they
        do not load (the check fails the bundle anyway)."""
        loaded = load(root, paths)
        return structure(loaded.resources) if loaded.ok else None

    async def proxy(
        self, check: ProxyCheck, binary: Binary, root: Path, paths: Sequence[str]
    ) -> ValidationResult | None:
        """A project validated by `envoy`: `envoy --mode validate` on a bootstrap that
        embeds the bundle's resources (validate.py), run with the binary the pipeline
        found for it, within the check's timeout; Envoy's own words when it refuses."""
        if check.kind != "envoy":
            return None
        started = time.monotonic()

        def result(ok: bool, output: str) -> ValidationResult:
            elapsed = timedelta(seconds=time.monotonic() - started)
            return ValidationResult(
                check.label, ok, cap_output(output), elapsed, version=f"envoy {binary.version}"
            )

        loaded = await asyncio.to_thread(load, root, paths)
        if not loaded.ok:
            return result(False, "not run: the bundle's xDS resources do not load (see the xds check)")
        verdict = await validate.run(loaded.resources, check.timeout.total_seconds(), binary.path)
        if verdict.ok:
            return result(True, verdict.output or "valid")
        return result(False, f"envoy {binary.version} refused the resources: {verdict.output}")


def _top_level_resources(root: Path, path: str) -> bool:
    """Whether the file holds resources in one of the shapes `resources.load` reads."""
    fmt = EXTENSIONS[os.path.splitext(path)[1].lower()]
    parsed = parse(root, path, fmt)
    if not parsed.ok:
        return False
    documents = parsed.document if fmt is ConfigFormat.YAML else [parsed.document]
    for doc in documents:
        items = doc if isinstance(doc, list) else doc.get("resources") if isinstance(doc, dict) else None
        if isinstance(doc, dict) and isinstance(doc.get("@type"), str):
            items = [doc]
        if isinstance(items, list) and any(
            isinstance(i, dict) and i.get("@type") in types.BY_URL for i in items
        ):
            return True
    return False


def validation_result(loaded: Loaded, duration: timedelta = timedelta(0)) -> ValidationResult:
    if loaded.ok:
        count = loaded.resources.count()
        return ValidationResult(
            VALIDATOR, True, f"{count} resource(s) in {len(loaded.files)} file(s)", duration
        )
    return ValidationResult(VALIDATOR, False, "\n".join(loaded.errors), duration)


def _fingerprint(message: Any) -> str:
    return hashlib.sha256(canonical(message)).hexdigest()[:16]


def _address(listener: Any) -> str:
    sa = listener.address.socket_address
    return f"{sa.address}:{sa.port_value}" if sa.address else ""


def structure(resources: ResourceSet) -> dict[str, dict[str, Any]]:
    """Listeners, upstreams (clusters), routes and TLS/auth/rate-limit blocks, each with
    a fingerprint, in the shape `domain/bundles/risk.py` compares."""
    out: dict[str, dict[str, Any]] = {
        k: {} for k in ("listeners", "upstreams", "routes", "tls", "auth", "rate_limits", "unparsed")
    }
    endpoints: dict[str, list[str]] = {}
    for name, r in resources.of(types.ENDPOINT).items():
        cla: Any = types.ENDPOINT.message()
        cla.ParseFromString(r.body)
        endpoints[name] = _targets(cla)
    for rtype in types.ORDER:
        for name, r in resources.of(rtype).items():
            message: Any = rtype.message()
            message.ParseFromString(r.body)
            where = f"{rtype.noun}/{name}"
            if rtype is types.LISTENER:
                tls = [m for m, _, _ in refs.walk(message) if m.DESCRIPTOR.full_name in _TLS]
                out["listeners"][name] = {
                    "address": _address(message),
                    "protocol": "https" if tls else "http",
                    "tls": hashlib.sha256(b"".join(canonical(m) for m in tls)).hexdigest()[:16]
                    if tls
                    else "",
                    "fingerprint": r.version,
                }
            elif rtype is types.CLUSTER:
                own = _targets(message.load_assignment) if message.HasField("load_assignment") else []
                cla = resources.of(types.ENDPOINT)
                fetched = sorted(n for (u, n) in r.refs if u == types.ENDPOINT.url and n in cla)
                targets = sorted(own + [t for n in fetched for t in endpoints[n]])
                # The cluster and the endpoints it fetches: either changing is the upstream's.
                fp = hashlib.sha256("".join([r.digest, *(cla[n].digest for n in fetched)]).encode())
                out["upstreams"][name] = {"targets": targets, "fingerprint": fp.hexdigest()[:16]}
            elif rtype is types.SECRET:
                out["tls"][where] = r.version
            _blocks(message, where, out)
    return out


def _targets(cla: Any) -> list[str]:
    found = []
    for locality in cla.endpoints:
        for lb in locality.lb_endpoints:
            sa = lb.endpoint.address.socket_address
            if sa.address:
                found.append(f"{sa.address}:{sa.port_value}")
    return found


def _blocks(message: Any, where: str, out: dict[str, dict[str, Any]]) -> None:
    """Routes (by route configuration, virtual host and position), and TLS, auth and
    rate-limit blocks (by resource and field path), wherever they sit."""
    for found, path, _field in refs.walk(message):
        m: Any = found
        kind = m.DESCRIPTOR.full_name
        key = f"{where}/{path}" if path else where
        if kind == "envoy.config.route.v3.VirtualHost":
            for route in m.routes:
                # Keyed by what it matches, not its position: inserting one route is one
                # route added, not every later one changed.
                match = route.name or text_format.MessageToString(route.match, as_one_line=True)
                action = route.route
                upstream = action.cluster or ",".join(
                    sorted(w.name for w in action.weighted_clusters.clusters)
                )
                out["routes"][f"{key}/{m.name}/{match}"] = {
                    "upstream": upstream,
                    "fingerprint": _fingerprint(route),
                }
        elif kind in _TLS:
            out["tls"][key] = _fingerprint(m)
        elif kind in _AUTH:
            out["auth"][key] = _fingerprint(m)
        elif kind in _RATE_LIMITS:
            out["rate_limits"][key] = _fingerprint(m)
