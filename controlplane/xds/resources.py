"""An xDS bundle: a directory of Envoy resources, parsed into v3 messages and checked.

Every `.yaml`, `.yml` and `.json` file of the bundle holds resources, in any of these
shapes (YAML files may hold several documents):

    {"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "name": ...}
    [ {"@type": ...}, {"@type": ...} ]
    {"resources": [ {"@type": ...}, ... ]}          # Envoy's file-subscription shape

The types are Listener, RouteConfiguration, Cluster, ClusterLoadAssignment and Secret
(`types.ORDER`). A bundle fails, with every error naming the file, the resource and the
field path, when a resource does not parse, has a field its type does not have or a
value of the wrong type, names a type URL that is not one of these (or, nested, not in
Envoy's v3 API), repeats a name, refers to a route, cluster, endpoint set, secret or
listener the bundle does not hold, takes part in a reference cycle, is larger than a
response may carry, or holds key material (any file with a PEM private key, or an inline
key in a resource): bundles are downloadable and diffed, so TLS reaches Envoy as SDS
references to files on the Envoy host.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor

from controlplane.domain.bundles.archive.formats import ConfigFormat, parse
from controlplane.xds import refs, shape, types
from controlplane.xds.snapshot import Resource, ResourceSet, canonical

# One resource's serialized size: far above any hand-written resource; a state-of-the-
# world response must still carry all of a type's resources in one message.
MAX_RESOURCE_BYTES = 1024 * 1024
# All resources of one type: a state-of-the-world response carries them at once, and
# gRPC clients (grpcio's xDS client among them) refuse messages over 4 MiB by default.
MAX_TYPE_BYTES = 3 * 1024 * 1024 + 512 * 1024
MAX_RESOURCES = 10_000
MAX_NAME = 1024
# Errors kept per bundle: enough to fix a file in one go, bounded for storage.
MAX_ERRORS = 50
EXTENSIONS = {".yaml": ConfigFormat.YAML, ".yml": ConfigFormat.YAML, ".json": ConfigFormat.JSON}
# A file is scanned for private keys in blocks this large (with an overlap), whatever
# its size, so a huge file costs reads, not memory.
_SCAN_BLOCK = 1024 * 1024
_PEM_KEY = re.compile(rb"-----BEGIN (?:[A-Z0-9 ]+ )?PRIVATE KEY-----")
_BAD_NAME = re.compile(r"[\x00-\x1f\x7f]")
_ALLOWED_TOP = {"resources", "version_info", "type_url"}


@dataclass(frozen=True)
class Loaded:
    """The resources of a bundle, or why it is refused."""

    resources: ResourceSet
    errors: tuple[str, ...] = ()
    # The files that held resources, in order.
    files: tuple[str, ...] = ()
    # Where each resource was defined: (type URL, name) -> file.
    sources: Mapping[tuple[str, str], str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors


@dataclass
class _Entry:
    where: str
    value: Any


@dataclass
class _Built:
    resource: Resource
    where: str
    edges: tuple[refs.Edge, ...]


class _Errors:
    def __init__(self) -> None:
        self.lines: list[str] = []
        # Resources that failed to build, by (type URL, name): what refers to them is not
        # told again that they are missing.
        self.failed: set[tuple[str, str]] = set()

    def add(self, line: str) -> None:
        if len(self.lines) < MAX_ERRORS:
            self.lines.append(line)
        elif len(self.lines) == MAX_ERRORS:
            self.lines.append(f"(more errors not shown; the first {MAX_ERRORS} are above)")

    @property
    def full(self) -> bool:
        return len(self.lines) >= MAX_ERRORS


def load(root: Path, paths: Iterable[str] | None = None) -> Loaded:
    """Parse and check the resources of the bundle tree at `root`.

    `paths` are the bundle's files relative to `root` (its manifest); by default every
    regular file under `root`. Blocking (file reads, parsing): call it from a thread.
    """
    all_paths = sorted(paths) if paths is not None else sorted(_files(root))
    errors = _Errors()
    for path in all_paths:
        if _holds_private_key(root / path):
            errors.add(
                f"{path}: holds a PEM private key; bundles carry no private keys (TLS reaches Envoy "
                "as SDS references to files on the Envoy host)"
            )
    built: list[_Built] = []
    files: list[str] = []
    for path in all_paths:
        fmt = EXTENSIONS.get(os.path.splitext(path)[1].lower())
        if fmt is None or errors.full:
            continue
        before = len(built)
        for entry in _entries(root, path, fmt, errors):
            item = _build(entry, errors)
            if item is not None:
                built.append(item)
        if len(built) > before:
            files.append(path)
    if len(built) > MAX_RESOURCES:
        errors.add(f"the bundle holds {len(built)} resources, over the limit of {MAX_RESOURCES}")
    sources = _unique(built, errors)
    resources = ResourceSet(b.resource for b in built)
    _check_sizes(resources, errors)
    _check_references(built, sources, errors)
    _check_cycles(built, sources, errors)
    return Loaded(resources, tuple(errors.lines), tuple(files), sources)


def _files(root: Path) -> Iterator[str]:
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            full = Path(dirpath) / name
            if full.is_file():
                yield str(full.relative_to(root))


def _holds_private_key(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            tail = b""
            while block := f.read(_SCAN_BLOCK):
                if _PEM_KEY.search(tail + block):
                    return True
                tail = block[-64:]
    except OSError:
        return False
    return False


def _entries(root: Path, path: str, fmt: ConfigFormat, errors: _Errors) -> Iterator[_Entry]:
    parsed = parse(root, path, fmt)
    if not parsed.ok:
        errors.add(parsed.error)
        return
    documents = parsed.document if fmt is ConfigFormat.YAML else [parsed.document]
    many = len(documents) > 1
    for d, doc in enumerate(documents):
        where = f"{path} (document {d + 1})" if many else path
        if doc is None:
            continue
        if isinstance(doc, list):
            for i, item in enumerate(doc):
                yield _Entry(f"{where}: [{i}]", item)
        elif isinstance(doc, dict) and "@type" in doc:
            yield _Entry(where, doc)
        elif isinstance(doc, dict) and "resources" in doc:
            extra = sorted(str(k) for k in doc if k not in _ALLOWED_TOP)
            if extra:
                errors.add(f"{where}: unexpected key(s) {', '.join(extra)} beside 'resources'")
            items = doc["resources"]
            if not isinstance(items, list):
                errors.add(f"{where}: resources: expected a list, got {shape.show(items)}")
                continue
            for i, item in enumerate(items):
                yield _Entry(f"{where}: resources[{i}]", item)
        else:
            errors.add(
                f"{where}: not xDS resources: expected an object with '@type', a list of them, "
                "or an object with 'resources'"
            )


def _build(entry: _Entry, errors: _Errors) -> _Built | None:
    value = entry.value
    if not isinstance(value, dict):
        errors.add(f"{entry.where}: expected a resource (an object with '@type'), got {shape.show(value)}")
        return None
    url = value.get("@type")
    rtype = types.BY_URL.get(url) if isinstance(url, str) else None
    if rtype is None:
        kinds = ", ".join(t.noun for t in types.ORDER)
        errors.add(
            f"{entry.where}: @type: {shape.show(url)} is not a resource type a bundle can carry "
            f"({kinds}, as type.googleapis.com/envoy.config...v3 URLs)"
        )
        return None
    body = {k: v for k, v in value.items() if k != "@type"}
    named = _name_of(body, rtype)
    label = f"{entry.where} ({rtype.noun} {named!r})" if named else f"{entry.where} ({rtype.noun})"
    descriptor = cast(Descriptor, rtype.message.DESCRIPTOR)
    problems = shape.check(body, descriptor)
    if problems:
        errors.failed.add((rtype.url, named))
        for p in problems:
            errors.add(f"{label}: {p}")
        return None
    message: Any = rtype.message()
    try:
        json_format.ParseDict(body, message)
    except (json_format.ParseError, ValueError, TypeError) as e:
        errors.failed.add((rtype.url, named))
        errors.add(f"{label}: {str(e).strip().splitlines()[0][:300]}")
        return None
    name = getattr(message, rtype.name_field)
    if not name:
        errors.add(f"{label}: {rtype.name_field}: a {rtype.noun} needs a name")
        return None
    if len(name) > MAX_NAME or _BAD_NAME.search(name):
        errors.add(f"{label}: {rtype.name_field}: names are at most {MAX_NAME} printable characters")
        return None
    facts = refs.facts(rtype, message)
    for problem in facts.problems:
        errors.add(f"{label}: {problem}")
    if facts.problems:
        errors.failed.add((rtype.url, name))
        return None
    body_bytes = canonical(message)
    if len(body_bytes) > MAX_RESOURCE_BYTES:
        errors.failed.add((rtype.url, name))
        errors.add(
            f"{label}: {len(body_bytes)} bytes, over the {MAX_RESOURCE_BYTES}-byte limit for a resource"
        )
        return None
    links = frozenset((e.type_url, e.name) for e in facts.edges)
    return _Built(Resource(rtype.url, name, body_bytes, links), label, facts.edges)


def _name_of(body: dict[str, Any], rtype: types.ResourceType) -> str:
    name = body.get(rtype.name_field)
    if name is None and rtype.name_field == "cluster_name":
        name = body.get("clusterName")
    return name if isinstance(name, str) else ""


def _unique(built: list[_Built], errors: _Errors) -> dict[tuple[str, str], str]:
    sources: dict[tuple[str, str], str] = {}
    for b in built:
        key = (b.resource.type_url, b.resource.name)
        if key in sources:
            errors.add(f"{b.where}: {types.short(key[0])} {key[1]!r} is also defined at {sources[key]}")
        else:
            sources[key] = b.where
    return sources


def _check_sizes(resources: ResourceSet, errors: _Errors) -> None:
    for rtype in types.ORDER:
        total = sum(len(r.body) for r in resources.of(rtype).values())
        if total > MAX_TYPE_BYTES:
            errors.add(
                f"the bundle's {rtype.noun} resources take {total} bytes, over the {MAX_TYPE_BYTES} "
                "bytes one state-of-the-world response may carry"
            )


def _check_references(built: list[_Built], sources: Mapping[tuple[str, str], str], errors: _Errors) -> None:
    for b in built:
        for edge in b.edges:
            if (edge.type_url, edge.name) in sources or (edge.type_url, edge.name) in errors.failed:
                continue
            hint = ""
            if edge.type_url == types.ENDPOINT.url:
                hint = (
                    " (endpoints from your own discovery: give the cluster an eds_config of its own "
                    "instead of ads, or use a DNS cluster)"
                )
            what = f"{types.short(edge.type_url)} {edge.name!r}"
            errors.add(f"{b.where}: {edge.path}: {what} is not in the bundle{hint}")


def _check_cycles(built: list[_Built], sources: Mapping[tuple[str, str], str], errors: _Errors) -> None:
    """Report each reference cycle once, from its first resource in name order."""
    graph: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for b in built:
        key = (b.resource.type_url, b.resource.name)
        if key in graph or sources.get(key) != b.where:
            continue  # a duplicate: reported already
        graph[key] = sorted({(e.type_url, e.name) for e in b.edges if (e.type_url, e.name) in sources})
    white, grey, black = 0, 1, 2
    color = dict.fromkeys(graph, white)
    reported: set[frozenset[tuple[str, str]]] = set()
    for start in sorted(graph):
        if color[start] != white:
            continue
        # Iterative DFS: a chain of thousands of aggregate clusters must not recurse.
        path: list[tuple[str, str]] = [start]
        iters = [iter(graph[start])]
        color[start] = grey
        while iters:
            nxt = next(iters[-1], None)
            if nxt is None:
                color[path.pop()] = black
                iters.pop()
                continue
            if color.get(nxt, black) == grey:
                cycle = path[path.index(nxt) :]
                if frozenset(cycle) not in reported:
                    reported.add(frozenset(cycle))
                    chain = " -> ".join(f"{types.short(u)} {n!r}" for u, n in [*cycle, nxt])
                    errors.add(f"{sources[cycle[0]]}: reference cycle: {chain}")
            elif color.get(nxt) == white:
                color[nxt] = grey
                path.append(nxt)
                iters.append(iter(graph[nxt]))
