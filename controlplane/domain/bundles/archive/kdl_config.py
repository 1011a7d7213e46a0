"""What a KDL proxy configuration (Zentinel's format) declares: listeners, routes,
upstreams, and the TLS, authentication and rate-limit blocks wherever they appear.

    listeners { listener "https" { address "0.0.0.0:443"; protocol "https"; tls { ... } } }
    upstreams { upstream "backend" { target "10.0.0.1:8080" } }
    routes    { route "api" { matches { path-prefix "/api" }; upstream "backend" } }

The structure feeds the SBOM and the risk score; it is plain JSON so it can be stored
and compared with the next bundle's. Blocks are compared by fingerprint (a hash of
the block's canonical text), so any change inside one is seen without knowing every
option a proxy has.

A file is read into `FileFacts` (`read`): its share of the structure and what the
Zentinel checks need, small and plain, so a worker process can parse the file and send
back only this (see `kdl_pool`). A string the database could not store (holding
U+0000 or a lone surrogate) makes the file an error naming it, never a stored value.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controlplane.domain.bundles.archive.formats import ConfigFormat, Parsed, Tagged, parse, plain
from controlplane.domain.bundles.archive.formats import KdlDocument as Document
from controlplane.domain.bundles.archive.formats import KdlNode as Node

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


@dataclass(frozen=True)
class FileFacts:
    """What one KDL file declares: its share of the structure (`structure`, without
    `unparsed`) and, for the Zentinel checks, its entities in order as (section, id),
    the errors found in them alone, and its routes' (id, upstream)."""

    path: str
    version: int
    structure: Structure
    entities: tuple[tuple[str, str], ...] = ()
    errors: tuple[str, ...] = ()
    routes: tuple[tuple[str, str], ...] = ()


def facts(path: str, doc: Document) -> FileFacts:
    out = empty()
    del out["unparsed"]
    entities: list[tuple[str, str]] = []
    errors: list[str] = []
    routes: list[tuple[str, str]] = []
    for index, (section, node) in enumerate(_entities(doc.nodes)):
        ident = _ident(node, index)
        entities.append((section, ident))
        if section == "listeners":
            tls = next((c for c in node.nodes if c.name in TLS), None)
            out["listeners"][ident] = {
                "address": _first(node, "address"),
                "protocol": _first(node, "protocol"),
                "tls": fingerprint(tls) if tls is not None else "",
                "fingerprint": fingerprint(node),
            }
            errors.extend(_listener_errors(path, ident, node))
        elif section == "upstreams":
            targets = _child_values(node, "target")
            out["upstreams"][ident] = {"targets": sorted(targets), "fingerprint": fingerprint(node)}
            if not targets:
                errors.append(f"{path}: upstream {ident!r} has no target")
        else:
            upstream = _first(node, "upstream")
            out["routes"][ident] = {"upstream": upstream, "fingerprint": fingerprint(node)}
            routes.append((ident, upstream))
    _blocks(doc.nodes, path, out)
    return FileFacts(path, doc.version, out, tuple(entities), tuple(errors), tuple(routes))


# What PostgreSQL cannot store in text or JSONB: NUL, and UTF-16 surrogates on their own
# (a strict UTF-8 decode leaves none, but a parser's escapes might make one).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
_SHOWN = 60
# A node's path as (parent's scope, name): built into text only for a message, so a long
# name above many nodes is not copied into each of them.
_Scope = tuple[Any, str] | None


def _unstorable(doc: Document) -> str | None:
    """Where the document holds a string the database could not store: anywhere, not
    only in what the structure keeps today, so no later field can meet one."""
    stack: list[tuple[_Scope, Node]] = [(None, n) for n in reversed(doc.nodes)]
    while stack:
        parent, node = stack.pop()
        scope: _Scope = (parent, node.name)
        strings = [("name", node.name)]
        strings += [("argument", plain(a)) for a in node.args]
        for key, value in node.props.items():
            strings += [("property name", key), (f"property {_cut(key)}", plain(value))]
        strings += [
            ("type annotation", v.tag) for v in (*node.args, *node.props.values()) if isinstance(v, Tagged)
        ]
        for what, value in strings:
            if isinstance(value, str) and _UNSTORABLE.search(value):
                return f"the {what} {_cut(value)} of node {_cut(_path(scope))}"
        stack.extend((scope, c) for c in reversed(node.nodes))
    return None


def _path(scope: _Scope) -> str:
    names: list[str] = []
    while scope is not None:
        scope, name = scope
        names.append(name)
    return "/".join(reversed(names))


def _cut(value: str) -> str:
    """`value` quoted and escaped (NUL shows as \\x00), at most _SHOWN characters of it."""
    return repr(value if len(value) <= _SHOWN else value[:_SHOWN] + "…")


def read(root: Path, path: str) -> Parsed:
    """`root/path` parsed as KDL into its FileFacts (the `document`), or the error. A
    string holding U+0000 or a lone surrogate anywhere in it is an error naming the
    file: PostgreSQL cannot store either, and a name goes into the stored structure."""
    parsed = parse(root, path, ConfigFormat.KDL)
    if not parsed.ok:
        return parsed
    bad = _unstorable(parsed.document)
    if bad is not None:
        return Parsed(
            path,
            error=f"{path}: {bad} holds U+0000 (NUL) or a lone surrogate, which the control plane "
            "does not store",
        )
    return Parsed(path, facts(path, parsed.document))


def merge(files: Iterable[FileFacts]) -> Structure:
    """The structure declared by several files (a later id wins)."""
    out = empty()
    for file in files:
        for kind, items in file.structure.items():
            out[kind].update(items)
    return out


def extract(documents: Iterable[tuple[str, Document]]) -> Structure:
    """The structure declared by several parsed KDL documents (a later id wins)."""
    return merge(facts(path, doc) for path, doc in documents)


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


def zentinel_errors(files: Iterable[FileFacts]) -> list[str]:
    """What Zentinel would refuse in these files, as far as the structure shows."""
    errors: list[str] = []
    seen: dict[str, dict[str, str]] = {"listeners": {}, "upstreams": {}, "routes": {}}
    routes: list[tuple[str, str, str]] = []
    for file in files:
        for section, ident in file.entities:
            if ident in seen[section]:
                errors.append(
                    f"{file.path}: {SECTIONS[section]} {ident!r} is declared twice "
                    f"(also in {seen[section][ident]})"
                )
            seen[section][ident] = file.path
        errors.extend(file.errors)
        routes.extend((file.path, ident, upstream) for ident, upstream in file.routes)
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
