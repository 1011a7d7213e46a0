"""What a KDL proxy configuration (Zentinel's format) declares: listeners, routes,
upstreams, and the TLS, authentication and rate-limit blocks wherever they appear.

    listeners { listener "https" { address "0.0.0.0:443"; protocol "https"; tls { ... } } }
    upstreams { upstream "backend" { target "10.0.0.1:8080" } }
    routes    { route "api" { matches { path-prefix "/api" }; upstream "backend" } }

The structure feeds the SBOM and the risk score; it is plain JSON so it can be stored
and compared with the next bundle's. Blocks are compared by fingerprint (a hash of
the block's canonical text), so any change inside one is seen without knowing every
option a proxy has.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from typing import Any

from controlplane.archives.formats import KdlDocument as Document
from controlplane.archives.formats import KdlNode as Node
from controlplane.archives.formats import plain

SECTIONS = {"listeners": "listener", "upstreams": "upstream", "routes": "route"}
TLS = frozenset({"tls", "ssl", "mtls"})
AUTH = frozenset(
    {
        "auth",
        "authentication",
        "authorization",
        "basic-auth",
        "jwt",
        "oidc",
        "oauth",
        "oauth2",
        "api-key",
        "waf",
    }
)
RATE_LIMIT = frozenset({"rate-limit", "rate-limits", "ratelimit", "rate-limiting", "limits"})
PROTOCOLS = frozenset({"http", "https", "h2", "h3"})
_SECURE = frozenset({"https", "h3"})

Structure = dict[str, dict[str, Any]]


def empty() -> Structure:
    # `unparsed`: path -> why, for .kdl files whose structure could not be read (risk
    # says so rather than judging them unchanged).
    return {
        "listeners": {},
        "upstreams": {},
        "routes": {},
        "tls": {},
        "auth": {},
        "rate_limits": {},
        "unparsed": {},
    }


def _render(node: Node) -> str:
    """Canonical text of a node and its children: props sorted, numbers normalized."""
    props = " ".join(f"{k}={_value(v)}" for k, v in sorted(node.props.items()))
    args = " ".join(_value(a) for a in node.args)
    children = "".join(_render(c) for c in node.nodes)
    return f"({node.name} {args} {props} {{{children}}})"


def _value(value: Any) -> str:
    # Type annotations are left out, as kdl-py (the parser before) left them out: the
    # fingerprints of stored bundles stay comparable.
    value = plain(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return repr(value)


def fingerprint(node: Node) -> str:
    return hashlib.sha256(_render(node).encode()).hexdigest()[:16]


def _ident(node: Node, index: int) -> str:
    for arg in node.args:
        if isinstance(plain(arg), str):
            return str(plain(arg))
    ident = plain(node.props.get("id")) or plain(node.props.get("name"))
    return str(ident) if ident is not None else f"#{index}"


def _text(value: Any) -> str:
    value = plain(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _child_values(node: Node, name: str) -> list[str]:
    return [_text(a) for c in node.nodes if c.name == name for a in c.args]


def _first(node: Node, name: str) -> str:
    values = _child_values(node, name)
    return values[0] if values else ""


def _kind(node: Node) -> str | None:
    """`tls`, `auth` or `rate_limits` for a block of that kind, by name or `type`."""
    names = {node.name}
    names.update(str(plain(v)) for v in node.props.values() if isinstance(plain(v), str))
    names.update(_child_values(node, "type"))
    if node.name in TLS:
        return "tls"
    if names & AUTH:
        return "auth"
    if names & RATE_LIMIT:
        return "rate_limits"
    return None


def _entities(nodes: Iterable[Node]) -> Iterator[tuple[str, Node]]:
    """(section, node) for every listener, upstream and route, in or out of a section."""
    singular = set(SECTIONS.values())
    for node in nodes:
        if node.name in SECTIONS:
            for child in node.nodes:
                if child.name == SECTIONS[node.name]:
                    yield node.name, child
        elif node.name in singular:
            yield node.name + "s", node


def extract(documents: Iterable[tuple[str, Document]]) -> Structure:
    """The structure declared by several KDL files (a later id wins)."""
    out = empty()
    for path, doc in documents:
        for index, (section, node) in enumerate(_entities(doc.nodes)):
            ident = _ident(node, index)
            if section == "listeners":
                tls = next((c for c in node.nodes if c.name in TLS), None)
                out["listeners"][ident] = {
                    "address": _first(node, "address"),
                    "protocol": _first(node, "protocol"),
                    "tls": fingerprint(tls) if tls is not None else "",
                    "fingerprint": fingerprint(node),
                }
            elif section == "upstreams":
                out["upstreams"][ident] = {
                    "targets": sorted(_child_values(node, "target")),
                    "fingerprint": fingerprint(node),
                }
            else:
                out["routes"][ident] = {
                    "upstream": _first(node, "upstream"),
                    "fingerprint": fingerprint(node),
                }
        _blocks(doc.nodes, path, out)
    return out


def _blocks(nodes: Iterable[Node], scope: str, out: Structure) -> None:
    for node in nodes:
        here = f"{scope}/{node.name}"
        if node.args and isinstance(plain(node.args[0]), str):
            here += f"[{plain(node.args[0])}]"
        kind = _kind(node)
        if kind is not None:
            out[kind][here] = fingerprint(node)
            continue
        _blocks(node.nodes, here, out)


def zentinel_errors(documents: Iterable[tuple[str, Document]]) -> list[str]:
    """What Zentinel would refuse in these files, as far as the structure shows."""
    errors: list[str] = []
    seen: dict[str, dict[str, str]] = {"listeners": {}, "upstreams": {}, "routes": {}}
    routes: list[tuple[str, str, str]] = []
    for path, doc in documents:
        for index, (section, node) in enumerate(_entities(doc.nodes)):
            ident = _ident(node, index)
            noun = SECTIONS[section]
            if ident in seen[section]:
                errors.append(f"{path}: {noun} {ident!r} is declared twice (also in {seen[section][ident]})")
            seen[section][ident] = path
            if section == "listeners":
                errors.extend(_listener_errors(path, ident, node))
            elif section == "upstreams" and not _child_values(node, "target"):
                errors.append(f"{path}: upstream {ident!r} has no target")
            elif section == "routes":
                routes.append((path, ident, _first(node, "upstream")))
    if not seen["listeners"]:
        errors.append('no listener is declared (listeners { listener "name" { address ... } })')
    for path, ident, upstream in routes:
        if upstream and upstream not in seen["upstreams"]:
            errors.append(f"{path}: route {ident!r} names upstream {upstream!r}, which is not declared")
    return errors


def _listener_errors(path: str, ident: str, node: Node) -> list[str]:
    errors = []
    address = _first(node, "address")
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        errors.append(f"{path}: listener {ident!r} needs an address of the form host:port, got {address!r}")
    protocol = _first(node, "protocol") or "http"
    if protocol not in PROTOCOLS:
        errors.append(f"{path}: listener {ident!r} has protocol {protocol!r}, not one of {sorted(PROTOCOLS)}")
    if protocol in _SECURE and not any(c.name in TLS for c in node.nodes):
        errors.append(f"{path}: listener {ident!r} uses {protocol} but has no tls block")
    return errors
